"""Versioned schema migrations, applied in order and recorded in ``shoal_schema_version``.

Each migration is a small function over alembic's programmatic
:class:`~alembic.operations.Operations` (no alembic script directory): it
says exactly what changes, so that an old database and a new one end with
the same schema. Never edit a released migration; append a new one.

Applying is idempotent and safe to run from several processes at once: the
whole run is one transaction that first takes a lock (a transaction-scoped
advisory lock on PostgreSQL, keyed by the current schema; the write lock on
SQLite), reads the recorded version, applies what is missing and records
it. A database recorded at a version newer than this code knows is refused
with a :class:`~shoal.core.errors.RegistryError` and left untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from shoal.core.errors import RegistryError
from shoal.registry.database import Database, lock_name
from shoal.registry.schema import (
    ClientStatus,
    ModelStatus,
    TokenOrigin,
    UtcDateTime,
    decision_id_type,
    enum_type,
    schema_version,
    version_key_type,
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: its number, a line for the record, and the change."""

    version: int
    description: str
    upgrade: Callable[[Operations], None]


def _create_client_registry(op: Operations) -> None:
    op.create_table(
        "clients",
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("device_class", sa.String(64), nullable=False),
        sa.Column("battery_level", sa.Float, nullable=False),
        sa.Column("charging", sa.Boolean, nullable=False),
        sa.Column("wifi", sa.Boolean, nullable=False),
        sa.Column("ram_gb", sa.Float, nullable=False),
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
        sa.PrimaryKeyConstraint("client_id", name="pk_clients"),
    )
    op.create_index("ix_clients_sampling", "clients", ["status", "sample_key"])
    if op.get_context().dialect.name == "postgresql":
        # room on each page for the new row version a heartbeat writes (a HOT update)
        op.execute("ALTER TABLE clients SET (fillfactor = 80)")
    op.create_table(
        "version_requirements",
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("component", sa.String(32), nullable=False),
        sa.Column("minimum_version", sa.String(64)),
        sa.Column("minimum_key", version_key_type()),
        sa.Column("allowed_versions", sa.JSON),
        sa.PrimaryKeyConstraint("model", "component", name="pk_version_requirements"),
    )


def _create_model_registry(op: Operations) -> None:
    op.create_table(
        "model_versions",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("parent", sa.Integer),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("blob", sa.String(64), nullable=False),
        sa.Column("state_blob", sa.String(64)),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("status", enum_type(ModelStatus, "model_status"), nullable=False),
        sa.Column("architecture_version", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name="pk_model_versions"),
        sa.ForeignKeyConstraint(
            ["name", "parent"],
            ["model_versions.name", "model_versions.version"],
            name="fk_model_versions_name_parent",
        ),
    )
    op.create_table(
        "model_heads",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("moved_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_model_heads"),
        sa.ForeignKeyConstraint(
            ["name", "version"],
            ["model_versions.name", "model_versions.version"],
            name="fk_model_heads_name_version",
        ),
    )


def _create_enrollment_tokens(op: Operations) -> None:
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_id", sa.String(16), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(128)),
        sa.Column("uses", sa.Integer, nullable=False),
        sa.Column("uses_left", sa.Integer, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False),
        sa.Column("revoked_at", UtcDateTime),
        sa.Column("last_used_at", UtcDateTime),
        sa.Column("last_used_by", sa.String(128)),
        sa.PrimaryKeyConstraint("token_id", name="pk_enrollment_tokens"),
        sa.UniqueConstraint("token_sha256", name="uq_enrollment_tokens_token_sha256"),
    )


def _create_privacy_ledger(op: Operations) -> None:
    op.create_table(
        "privacy_budgets",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("epsilon", sa.Float, nullable=False),
        sa.Column("delta", sa.Float, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("locked_at", UtcDateTime),
        sa.Column("lock_reason", sa.Text),
        sa.PrimaryKeyConstraint("run_id", name="pk_privacy_budgets"),
    )
    op.create_table(
        "privacy_rounds",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("round", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("epsilon", sa.Float, nullable=False),
        sa.Column("delta", sa.Float, nullable=False),
        sa.Column("noise_multiplier", sa.Float, nullable=False),
        sa.Column("sampling_rate", sa.Float, nullable=False),
        sa.Column("accountant", sa.String(64), nullable=False),
        sa.Column("participants", sa.Integer, nullable=False),
        sa.Column("participants_sha256", sa.String(64), nullable=False),
        sa.Column("recorded_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "round", name="pk_privacy_rounds"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["privacy_budgets.run_id"], name="fk_privacy_rounds_run_id"
        ),
    )
    op.create_table(
        "privacy_clients",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("participations", sa.Integer, nullable=False),
        sa.Column("epsilon_spent", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "client_id", name="pk_privacy_clients"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["privacy_budgets.run_id"], name="fk_privacy_clients_run_id"
        ),
    )
    op.create_index("ix_privacy_clients_spent", "privacy_clients", ["run_id", "epsilon_spent"])


def _add_model_verdict_reasons(op: Operations) -> None:
    op.add_column("model_versions", sa.Column("status_reason", sa.Text))
    op.add_column("model_versions", sa.Column("status_changed_at", UtcDateTime))


def _allow_unknown_device_facts(op: Operations) -> None:
    # SQLite cannot drop NOT NULL in place: batch mode copies the table (its index too)
    with op.batch_alter_table("clients") as batch:
        for name, kind in (
            ("battery_level", sa.Float()),
            ("charging", sa.Boolean()),
            ("wifi", sa.Boolean()),
            ("ram_gb", sa.Float()),
        ):
            batch.alter_column(name, existing_type=kind, nullable=True)


def _add_token_origins(op: Operations) -> None:
    # every token so far was issued by an operator; config-listed ones were never stored
    op.add_column(
        "enrollment_tokens",
        sa.Column(
            "origin",
            enum_type(TokenOrigin, "token_origin"),
            nullable=False,
            server_default=TokenOrigin.ISSUED.value,
        ),
    )


def _create_policy_decisions(op: Operations) -> None:
    op.create_table(
        "policy_decisions",
        sa.Column("decision_id", decision_id_type(), nullable=False, autoincrement=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("allowed", sa.Boolean, nullable=False),
        sa.Column("reasons", sa.JSON, nullable=False),
        sa.Column("facts", sa.JSON, nullable=False),
        sa.Column("decided_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("decision_id", name="pk_policy_decisions"),
    )
    op.create_index("ix_policy_decisions_run_id_round", "policy_decisions", ["run_id", "round"])


def _add_idle(op: Operations) -> None:
    # clients enrolled before reported no idleness: unknown, which no criterion on it accepts
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("idle", sa.Boolean))


def _widen_sampling_index(op: Operations) -> None:
    # a selection window tests the steady facts of a policy in the index (see schema.py)
    op.drop_index("ix_clients_sampling", table_name="clients")
    op.create_index(
        "ix_clients_sampling",
        "clients",
        ["status", "sample_key", "charging", "wifi", "app_version_key", "expires_at", "client_id"],
    )


def _add_model_signatures(op: Operations) -> None:
    # versions committed before signing existed stay unsigned (NULL)
    op.add_column("model_versions", sa.Column("run_id", sa.String(128)))
    op.add_column("model_versions", sa.Column("signing_key_id", sa.String(64)))
    op.add_column("model_versions", sa.Column("signature", sa.LargeBinary))


def _add_version_features(op: Operations) -> None:
    # versions of runs without a feature module (and all before them) stay NULL
    op.add_column("model_versions", sa.Column("features_sha256", sa.String(64)))


def _add_version_preprocessing(op: Operations) -> None:
    # versions of runs without a scaler (and all before them) stay NULL
    op.add_column("model_versions", sa.Column("preprocessing_sha256", sa.String(64)))


def _create_attestation_allow_list(op: Operations) -> None:
    op.create_table(
        "attestation_allow_list",
        sa.Column("build_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("label", sa.String(256), nullable=False),
        sa.Column("allowed_by", sa.String(128), nullable=False),
        sa.Column("allowed_at", UtcDateTime, nullable=False),
        sa.Column("allowed_reason", sa.Text, nullable=False),
        sa.Column("revoked_by", sa.String(128)),
        sa.Column("revoked_at", UtcDateTime),
        sa.Column("revoked_reason", sa.Text),
        sa.PrimaryKeyConstraint("build_id", name="pk_attestation_allow_list"),
    )


def _create_round_participants(op: Operations) -> None:
    op.create_table(
        "round_participants",
        sa.Column("entry_id", decision_id_type(), nullable=False, autoincrement=True),
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
        sa.PrimaryKeyConstraint("entry_id", name="pk_round_participants"),
    )
    op.create_index("ix_round_participants_run_id_round", "round_participants", ["run_id", "round"])
    op.create_index(
        "ix_round_participants_run_id_participant",
        "round_participants",
        ["run_id", "participant"],
    )


def _create_audit_log(op: Operations) -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("recorded_at", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_kind_seq", "audit_log", ["kind", "seq"])
    op.create_table(
        "audit_heads",
        sa.Column("seq", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("signed_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_heads"),
    )


def _number_privacy_attempts(op: Operations) -> None:
    # every round recorded so far belongs to the run's first pass over its round numbers; the
    # key takes the attempt, so that a round number replayed after HEAD moved back is recorded
    # again. SQLite cannot change a primary key in place: batch mode copies the table
    with op.batch_alter_table("privacy_rounds") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer, nullable=False, server_default="0"))
        batch.drop_constraint("pk_privacy_rounds", type_="primary")
        batch.create_primary_key("pk_privacy_rounds", ["run_id", "attempt", "round"])


def _create_round_asked(op: Operations) -> None:
    op.create_table(
        "round_asked",
        sa.Column("entry_id", decision_id_type(), nullable=False, autoincrement=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("participant", sa.String(128), nullable=False),
        sa.Column("recorded_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("entry_id", name="pk_round_asked"),
    )
    op.create_index("ix_round_asked_run_id_participant", "round_asked", ["run_id", "participant"])


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "client registry and versioning matrix", _create_client_registry),
    Migration(2, "model registry", _create_model_registry),
    Migration(3, "enrollment tokens", _create_enrollment_tokens),
    Migration(4, "privacy budget ledger", _create_privacy_ledger),
    Migration(5, "reasons for model verdicts", _add_model_verdict_reasons),
    Migration(6, "unknown device facts (power, network, RAM) as NULL", _allow_unknown_device_facts),
    Migration(
        7, "enrollment tokens listed in the config, with uses and an expiry", _add_token_origins
    ),
    Migration(8, "policy decisions on updates", _create_policy_decisions),
    Migration(9, "whether a device is idle (NULL: unknown)", _add_idle),
    Migration(10, "the sampling index carries a policy's steady facts", _widen_sampling_index),
    Migration(11, "the coordinator's signature on each model version", _add_model_signatures),
    Migration(12, "attestation allow-list of client builds", _create_attestation_allow_list),
    Migration(13, "each fit round's participants and their divergence", _create_round_participants),
    Migration(14, "tamper-evident audit log and its signed heads", _create_audit_log),
    Migration(
        15,
        "privacy rounds keyed by attempt: replayed rounds are new releases",
        _number_privacy_attempts,
    ),
    Migration(16, "the clients each round asked and did not count", _create_round_asked),
    Migration(17, "the feature module each model version was trained with", _add_version_features),
    Migration(18, "the scaler each model version's tasks carried", _add_version_preprocessing),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


def apply_migrations(database: Database, *, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Bring the database up to the newest migration; returns the version it is at."""
    _check_sequence(migrations)
    newest = migrations[-1].version if migrations else 0
    with database.write() as connection:
        lock_name(connection, "schema migrations")
        schema_version.create(connection, checkfirst=True)
        current = recorded_version(connection)
        if current > newest:
            raise RegistryError(
                f"the registry database {database.url} is at schema version {current}, "
                f"newer than this Shoal knows ({newest}): upgrade Shoal to open it"
            )
        operations = Operations(MigrationContext.configure(connection))
        for migration in migrations:
            if migration.version <= current:
                continue
            migration.upgrade(operations)
            connection.execute(
                schema_version.insert().values(
                    version=migration.version,
                    description=migration.description,
                    applied_at=datetime.now(UTC),
                )
            )
        return max(current, newest)


def check_schema_version(
    database: Database, *, migrations: tuple[Migration, ...] = MIGRATIONS
) -> int:
    """Refuse, without writing anything, a database not at the newest migration; returns it."""
    newest = migrations[-1].version if migrations else 0
    with database.read() as connection:
        current = recorded_version(connection)
    if current > newest:
        raise RegistryError(
            f"the registry database {database.url} is at schema version {current}, "
            f"newer than this Shoal knows ({newest}): upgrade Shoal to open it"
        )
    if current < newest:
        raise RegistryError(
            f"the registry database {database.url} is at schema version {current}, older than "
            f"this Shoal's ({newest}): start its coordinator (or any write command) to migrate it"
        )
    return current


def recorded_version(connection: Connection) -> int:
    """The newest migration recorded in the database (0 for a fresh one)."""
    if not sa.inspect(connection).has_table(schema_version.name):
        return 0
    newest = connection.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return int(newest or 0)


def _check_sequence(migrations: tuple[Migration, ...]) -> None:
    numbers = [migration.version for migration in migrations]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RegistryError(f"migrations must be numbered 1, 2, 3... in order, got {numbers}")
