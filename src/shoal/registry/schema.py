"""The registry's tables and indexes, as SQLAlchemy Core metadata (the schema at its newest).

The tables are created and changed only by the versioned migrations in
:mod:`shoal.registry.migrations`; this module is what queries are written
against, and a test checks that migrating an empty database yields exactly
this schema.

Conventions, the same on SQLite and PostgreSQL:

- times are UTC, stored without a zone and returned timezone-aware
  (:class:`UtcDateTime`);
- a version string is stored beside its sortable key (see
  :func:`shoal.registry.versioning.version_key`), compared in binary
  collation so that an index orders it as a version;
- enums are stored as their names in short strings (no native enum type, so
  adding a member needs no ``ALTER TYPE``).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect


def decision_id_type() -> sa.types.TypeEngine[int]:
    """A 64-bit row id (SQLite's rowid is one already, and only INTEGER autoincrements there)."""
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    }
)


class ClientStatus(enum.Enum):
    """Where a client stands: only ACTIVE clients are ever selected."""

    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    RETIRED = "RETIRED"


class ModelStatus(enum.Enum):
    """An operator's (or an evaluation's) verdict on a model version."""

    CANDIDATE = "CANDIDATE"
    GOOD = "GOOD"
    BAD = "BAD"


class TokenOrigin(enum.Enum):
    """Where an enrollment token comes from: issued by an operator, or listed in the config."""

    ISSUED = "ISSUED"
    CONFIG = "CONFIG"


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware datetime, stored as naive UTC on every backend."""

    impl = sa.DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"a naive datetime cannot be stored: {value!r}")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):  # pragma: no cover - the driver parses dates
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        return value.replace(tzinfo=UTC)


def version_key_type() -> sa.types.TypeEngine[str]:
    """A string compared byte by byte, so that its index orders version keys."""
    return sa.String(160).with_variant(sa.String(160, collation="C"), "postgresql")


def enum_type(enum_class: type[enum.Enum], name: str) -> sa.Enum:
    return sa.Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=False,
        length=16,
        validate_strings=True,
    )


schema_version = sa.Table(
    "shoal_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", UtcDateTime, nullable=False),
)

clients = sa.Table(
    "clients",
    metadata,
    sa.Column("client_id", sa.String(128), primary_key=True),
    sa.Column("device_class", sa.String(64), nullable=False),
    # NULL when the client did not report it: unknown, which no criterion on it accepts
    sa.Column("battery_level", sa.Float),
    sa.Column("charging", sa.Boolean),
    sa.Column("wifi", sa.Boolean),
    sa.Column("ram_gb", sa.Float),
    sa.Column("idle", sa.Boolean),
    sa.Column("app_version", sa.String(64), nullable=False),
    sa.Column("app_version_key", version_key_type()),
    sa.Column("runtime_version", sa.String(64), nullable=False),
    sa.Column("runtime_version_key", version_key_type()),
    sa.Column("model_architecture_version", sa.String(64), nullable=False),
    sa.Column("model_architecture_version_key", version_key_type()),
    sa.Column("feature_extractor_version", sa.String(64)),
    sa.Column("feature_extractor_version_key", version_key_type()),
    sa.Column("status", enum_type(ClientStatus, "client_status"), nullable=False),
    sa.Column("status_reason", sa.Text),
    sa.Column("can_train", sa.Boolean, nullable=False),
    sa.Column("rejection_reason", sa.Text),
    sa.Column("public_key", sa.LargeBinary),
    sa.Column("sample_key", sa.BigInteger, nullable=False),
    sa.Column("enrolled_at", UtcDateTime, nullable=False),
    sa.Column("last_seen", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime),
    # The selector walks this index from a random sample_key, within ACTIVE
    # clients (every selection asks for them). It also carries the facts most
    # policies ask about that change at most a few times a day (charging,
    # WiFi, the app version, the expiry) and the id, so that a window tests
    # them in the index and reads a row only for the rest (see BENCHMARKS.md:
    # a uniform selection reads no row at all). What
    # changes with every heartbeat (battery, idleness, free RAM, last_seen)
    # is left out, so such a heartbeat rewrites one row and no index entry
    # (on PostgreSQL, a HOT update); listing clients by last_seen is an
    # operator's query, and can afford a scan.
    sa.Index(
        "ix_clients_sampling",
        "status",
        "sample_key",
        "charging",
        "wifi",
        "app_version_key",
        "expires_at",
        "client_id",
    ),
)

version_requirements = sa.Table(
    "version_requirements",
    metadata,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("component", sa.String(32), primary_key=True),
    sa.Column("minimum_version", sa.String(64)),
    sa.Column("minimum_key", version_key_type()),
    sa.Column("allowed_versions", sa.JSON),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("parent", sa.Integer),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("blob", sa.String(64), nullable=False),
    sa.Column("state_blob", sa.String(64)),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("status", enum_type(ModelStatus, "model_status"), nullable=False),
    sa.Column("architecture_version", sa.String(64), nullable=False),
    # the operator's reason for the status, and when it was given (None while CANDIDATE)
    sa.Column("status_reason", sa.Text),
    sa.Column("status_changed_at", UtcDateTime),
    # the coordinator's Ed25519 signature over (run, name, version, round, sha256); NULL: unsigned
    sa.Column("run_id", sa.String(128)),
    sa.Column("signing_key_id", sa.String(64)),
    sa.Column("signature", sa.LargeBinary),
    # the sha256 of the run's feature module (a blob), signed with the version; NULL: none
    sa.Column("features_sha256", sa.String(64)),
    # the sha256 of the scaler its tasks carried ([preprocessing]; a blob), signed with it
    sa.Column("preprocessing_sha256", sa.String(64)),
    sa.ForeignKeyConstraint(["name", "parent"], ["model_versions.name", "model_versions.version"]),
)

model_heads = sa.Table(
    "model_heads",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("moved_at", UtcDateTime, nullable=False),
    sa.ForeignKeyConstraint(["name", "version"], ["model_versions.name", "model_versions.version"]),
)

enrollment_tokens = sa.Table(
    "enrollment_tokens",
    metadata,
    # the first 16 hex digits of token_sha256: a name an operator can quote, never the secret
    sa.Column("token_id", sa.String(16), primary_key=True),
    sa.Column("token_sha256", sa.String(64), nullable=False),
    sa.Column("client_id", sa.String(128)),
    sa.Column("uses", sa.Integer, nullable=False),
    sa.Column("uses_left", sa.Integer, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("revoked_at", UtcDateTime),
    sa.Column("last_used_at", UtcDateTime),
    sa.Column("last_used_by", sa.String(128)),
    # a CONFIG token's limits follow coordinator.enrollment_tokens at each start
    sa.Column(
        "origin",
        enum_type(TokenOrigin, "token_origin"),
        nullable=False,
        server_default=TokenOrigin.ISSUED.value,
    ),
    sa.UniqueConstraint("token_sha256"),
)

attestation_allow_list = sa.Table(
    "attestation_allow_list",
    metadata,
    # a build an attested client may run: a release manifest's sha256, or another kind's id
    sa.Column("build_id", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("label", sa.String(256), nullable=False),
    sa.Column("allowed_by", sa.String(128), nullable=False),
    sa.Column("allowed_at", UtcDateTime, nullable=False),
    sa.Column("allowed_reason", sa.Text, nullable=False),
    sa.Column("revoked_by", sa.String(128)),
    sa.Column("revoked_at", UtcDateTime),
    sa.Column("revoked_reason", sa.Text),
)

privacy_budgets = sa.Table(
    "privacy_budgets",
    metadata,
    sa.Column("run_id", sa.String(128), primary_key=True),
    sa.Column("epsilon", sa.Float, nullable=False),
    sa.Column("delta", sa.Float, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("locked_at", UtcDateTime),
    sa.Column("lock_reason", sa.Text),
)

privacy_rounds = sa.Table(
    "privacy_rounds",
    metadata,
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("round", sa.Integer, nullable=False, autoincrement=False),
    # the run's cumulative epsilon after this round, at ``delta``
    sa.Column("epsilon", sa.Float, nullable=False),
    sa.Column("delta", sa.Float, nullable=False),
    sa.Column("noise_multiplier", sa.Float, nullable=False),
    sa.Column("sampling_rate", sa.Float, nullable=False),
    sa.Column("accountant", sa.String(64), nullable=False),
    sa.Column("participants", sa.Integer, nullable=False),
    # the sha256 of the sorted participant ids: tells a retried round from a different one
    sa.Column("participants_sha256", sa.String(64), nullable=False),
    sa.Column("recorded_at", UtcDateTime, nullable=False),
    # which pass over the round numbers released this round: 0, then one more each time HEAD
    # moved back past a released round and the run replays its numbers (migration 15)
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.PrimaryKeyConstraint("run_id", "attempt", "round"),
    sa.ForeignKeyConstraint(["run_id"], ["privacy_budgets.run_id"]),
)

privacy_clients = sa.Table(
    "privacy_clients",
    metadata,
    sa.Column("run_id", sa.String(128), primary_key=True),
    sa.Column("client_id", sa.String(128), primary_key=True),
    sa.Column("participations", sa.Integer, nullable=False),
    sa.Column("epsilon_spent", sa.Float, nullable=False),
    sa.ForeignKeyConstraint(["run_id"], ["privacy_budgets.run_id"]),
    # the selector's question: which clients of this run have spent their limit?
    sa.Index("ix_privacy_clients_spent", "run_id", "epsilon_spent"),
)

# one row per policy decision on an update (shoal.governance.policy), allowed or denied
policy_decisions = sa.Table(
    "policy_decisions",
    metadata,
    sa.Column("decision_id", decision_id_type(), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("allowed", sa.Boolean, nullable=False),
    sa.Column("reasons", sa.JSON, nullable=False),  # [{"code": ..., "detail": ...}]
    sa.Column("facts", sa.JSON, nullable=False),  # what the policy was given
    sa.Column("decided_at", UtcDateTime, nullable=False),
    sa.Index("ix_policy_decisions_run_id_round", "run_id", "round"),
)

# one row per client counted in a fit round: who (a per-round pseudonym where the job asks for
# one) and how far its update lay from the round's aggregate and median (NULL under secure
# aggregation, where no single update is seen); ``model_version``: the version the round
# committed (NULL: the round committed none), so that a replayed round's rows stay apart
round_participants = sa.Table(
    "round_participants",
    metadata,
    sa.Column("entry_id", decision_id_type(), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("model_version", sa.Integer, nullable=True),
    sa.Column("participant", sa.String(128), nullable=False),
    sa.Column("l2_to_aggregate", sa.Float, nullable=True),
    sa.Column("cosine_to_aggregate", sa.Float, nullable=True),
    sa.Column("l2_to_median", sa.Float, nullable=True),
    sa.Column("cosine_to_median", sa.Float, nullable=True),
    sa.Column("z_score", sa.Float, nullable=True),
    sa.Column("flagged", sa.Boolean, nullable=True),
    sa.Column("recorded_at", UtcDateTime, nullable=False),
    sa.Index("ix_round_participants_run_id_round", "run_id", "round"),
    sa.Index("ix_round_participants_run_id_participant", "run_id", "participant"),
)

# one row per client a round asked and did not count (a fit round's surplus, drops and
# failures; every client an evaluation round asked), under its round's pseudonym: removing it
# from the population changes that round's draw, which unlearning must replay
round_asked = sa.Table(
    "round_asked",
    metadata,
    sa.Column("entry_id", decision_id_type(), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("phase", sa.String(16), nullable=False),
    sa.Column("participant", sa.String(128), nullable=False),
    sa.Column("recorded_at", UtcDateTime, nullable=False),
    sa.Index("ix_round_asked_run_id_participant", "run_id", "participant"),
)

# the audit log (shoal.registry.audit): append-only, each entry hash-chained to the one before;
# times are whole Unix seconds (floored to the log's granularity), hashed as they are stored
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("recorded_at", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("subject", sa.String(256), nullable=False),
    sa.Column("details", sa.Text, nullable=False),  # canonical JSON (see shoal.registry.audit)
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Index("ix_audit_log_kind_seq", "kind", "seq"),
)

# the coordinator's Ed25519 signatures on the log's head (seq, hash), one per signed seq
audit_heads = sa.Table(
    "audit_heads",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("signed_at", sa.BigInteger, nullable=False),
)
