"""The model registry: global model versions per model name, their blobs, HEAD and rollback.

A version is written blob first (content-addressed, atomic, through the
:class:`~shoal.registry.blobs.BlobStore`), then its row and the HEAD
pointer in one transaction: a crash at any point leaves the last committed
version intact, at worst with an unreferenced blob. Each version records
its round, parent, the sha256 of its parameters, metrics, a status
(:class:`ModelStatus`, with the reason and time of the last verdict) and the
architecture version it was built for, and may carry an opaque state blob
(the server optimizer's state, say).

With a :class:`VersionSigner` (the coordinator's key), each version is
signed as it is committed, once: the signature and the key's id are stored
in its row, for clients and auditors to check (see
:mod:`shoal.governance.model_signing`).

HEAD is the version new rounds build on. :meth:`ModelRegistry.rollback`
moves it to another version after checking that version's blob; the later
versions stay, for audit, and the next commit branches from the new HEAD.

>>> registry = ModelRegistry(database, BlobStore(folder))  # doctest: +SKIP
>>> registry.commit("digits", params, round=0, architecture_version="mlp-v1")  # doctest: +SKIP
"""

from __future__ import annotations

import builtins
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shoal.core.errors import NotFoundError, RegistryError
from shoal.core.parameters import Parameters
from shoal.registry.audit import AuditEvent, AuditLog, metrics_digest
from shoal.registry.blobs import BlobStore
from shoal.registry.clients import require_aware, utc_now
from shoal.registry.database import Database, EncodedJSON, lock_name, strict_json
from shoal.registry.rows import insert_rows
from shoal.registry.schema import ModelStatus, audit_heads, model_heads, model_versions


@dataclass(frozen=True, slots=True)
class VersionSignature:
    """The coordinator's signature on a version: for which run, by which key, the 64 bytes."""

    run_id: str
    key_id: str
    signature: bytes = field(repr=False)


class VersionSigner(Protocol):
    """Signs a version's facts once its number is known (inside the commit's transaction);
    ``features`` is given for a version trained with a feature module only, ``preprocessing``
    for one whose tasks carried a scaler only."""

    def __call__(
        self,
        *,
        name: str,
        version: int,
        round: int,
        sha256: str,
        features: str | None = None,
        preprocessing: str | None = None,
    ) -> VersionSignature: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRecord:
    """One committed version of a model: where it came from and what it scored."""

    name: str
    version: int
    round: int
    parent: int | None
    sha256: str
    blob: str
    state_blob: str | None
    created_at: datetime
    status: ModelStatus
    architecture_version: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    status_reason: str | None = None
    status_changed_at: datetime | None = None
    signed: VersionSignature | None = None
    features_sha256: str | None = None  # the feature module it was trained with (a blob)
    preprocessing_sha256: str | None = None  # the scaler its tasks carried (a blob)


_INSERTED = (
    "name",
    "version",
    "round",
    "parent",
    "sha256",
    "blob",
    "state_blob",
    "created_at",
    "metrics",
    "status",
    "architecture_version",
    "features_sha256",
    "preprocessing_sha256",
)


def _record(row: sa.Row[Any]) -> ModelRecord:
    return ModelRecord(
        name=row.name,
        version=row.version,
        round=row.round,
        parent=row.parent,
        sha256=row.sha256,
        blob=row.blob,
        state_blob=row.state_blob,
        created_at=row.created_at,
        status=row.status,
        architecture_version=row.architecture_version,
        metrics=_stored_metrics(row),
        status_reason=row.status_reason,
        status_changed_at=row.status_changed_at,
        signed=(
            None
            if row.signature is None
            else VersionSignature(row.run_id or "", row.signing_key_id or "", row.signature)
        ),
        features_sha256=row.features_sha256,
        preprocessing_sha256=row.preprocessing_sha256,
    )


def _inputs(features: str | None, preprocessing: str | None) -> dict[str, str]:
    """A signer's ``features`` and ``preprocessing`` arguments: each given only for a version
    trained with a module, or whose tasks carried a scaler (a signer written before either
    signs every other version as it did)."""
    given = {"features": features, "preprocessing": preprocessing}
    return {key: value for key, value in given.items() if value is not None}


def _stored_metrics(row: sa.Row[Any]) -> dict[str, Any]:
    """A version's metrics, read from its column's text (:data:`_VERSIONS`): a value that is
    not a JSON object (a registry edited by hand, or corrupt) is one RegistryError naming the
    version, not a traceback from every command that reads it."""
    try:
        metrics = json.loads(row.metrics)
    except (TypeError, ValueError, RecursionError):
        metrics = None
    if not isinstance(metrics, dict):
        raise RegistryError(
            f"model {row.name!r} version {row.version}: its metrics are not a JSON object "
            "(the registry is corrupt)"
        )
    return metrics


def _check_metrics(metrics: Mapping[str, Any]) -> EncodedJSON:
    """``metrics`` as the strict JSON text the version stores, encoded once: the insert
    writes this text as it is (:func:`~shoal.registry.database.strict_json`)."""
    try:  # what JSON cannot hold is refused here, NaN nested anywhere too
        return EncodedJSON(strict_json(metrics))
    except (TypeError, ValueError) as exc:
        for key, value in metrics.items():  # a top-level one is named
            if isinstance(value, float) and not math.isfinite(value):
                raise RegistryError(
                    f"metric {key!r} is {value}: only finite numbers can be stored"
                ) from None
        raise RegistryError(f"metrics must be finite JSON values: {exc}") from exc


SUPERSEDED = "superseded by unlearning"
"""How unlearning's BAD marks begin their reason: such a version holds a forgotten client's
updates, and stays BAD."""


def stored_architectures(database: Database) -> set[str]:
    """The model architectures the registry's versions declare (what the versioning matrix
    keys on)."""
    with database.read() as connection:
        query = sa.select(model_versions.c.architecture_version).distinct()
        return {str(value) for value in connection.execute(query).scalars()}


def model_lock(name: str) -> str:
    """The lock a change of model ``name``'s versions or HEAD takes (:func:`lock_name`)."""
    return f"model:{name}"


class HeadMoved(RegistryError):
    """HEAD is not the version a commit was built from: it moved meanwhile (a rollback)."""

    def __init__(self, name: str, *, expected: int, head: int | None) -> None:
        super().__init__(
            f"HEAD of {name} is version {head}, not version {expected} that the new version "
            "was built from"
        )
        self.expected = expected
        self.head = head


class ModelRegistry:
    """Every version of every model, with rows in ``database`` and blobs in ``blobs``.

    Commits, verdicts and rollbacks are recorded in ``audit`` (by default the
    database's audit log, as the coordinator), in their own transactions.
    """

    def __init__(
        self, database: Database, blobs: BlobStore, *, audit: AuditLog | None = None
    ) -> None:
        self.database = database
        self.blobs = blobs
        self.audit = AuditLog(database) if audit is None else audit

    def commit(
        self,
        name: str,
        parameters: Parameters,
        *,
        round: int,
        architecture_version: str,
        parent: int | Literal["head"] | None = "head",
        metrics: Mapping[str, Any] | None = None,
        status: ModelStatus = ModelStatus.CANDIDATE,
        state: bytes | None = None,
        now: datetime | None = None,
        signer: VersionSigner | None = None,
        expected_head: int | None = None,
        features_sha256: str | None = None,
        preprocessing_sha256: str | None = None,
    ) -> ModelRecord:
        """Store a new version of ``name`` and move HEAD to it.

        ``parent`` defaults to the current HEAD (None for the first
        version). Version numbers start at 0 and grow by one per model.
        ``signer`` signs the version (its number, round and sha256) in the
        same transaction: a stored version is signed from its first moment.
        ``expected_head``: the version the new one was built from; when HEAD is
        another now (someone rolled it back meanwhile), :class:`HeadMoved` and
        nothing is stored. ``features_sha256``: the feature module the version was
        trained with (its blob stored already), signed with it; ``preprocessing_sha256``: the
        scaler its tasks carried (its blob stored already), signed with it.
        """
        if not name or len(name) > 128:
            raise RegistryError(f"a model name has 1 to 128 characters, got {name!r}")
        if round < 0:
            raise RegistryError(f"round must be >= 0, got {round}")
        if status is ModelStatus.BAD:
            raise RegistryError("a version cannot be committed as BAD: commit, then mark it")
        encoded = _check_metrics(metrics or {})
        created_at = require_aware(now or utc_now(), "now")
        # the blobs are written on the store's thread. Inside a round's transaction, its rows
        # are written meanwhile and it commits once the blobs are on disk; alone, the blobs
        # land before this takes the write lock. A committed version's blobs always exist.
        blob, blob_written = self.blobs.put_soon(parameters.to_bytes())
        state_blob, state_written = (None, None) if state is None else self.blobs.put_soon(state)
        self.database.commit_after(blob_written)
        self.database.commit_after(state_written)
        with self.database.write() as connection:
            lock_name(connection, model_lock(name))
            if parent == "head":
                head = _head_version(connection, name)
                if expected_head is not None and head != expected_head:
                    raise HeadMoved(name, expected=expected_head, head=head)
            else:
                head = parent
                if parent is not None:
                    _fetch(connection, name, parent)
            newest = connection.execute(_NEWEST, {"name": name}).scalar()
            version = 0 if newest is None else int(newest) + 1
            sha256 = parameters.sha256()
            signed = (
                None
                if signer is None
                else signer(
                    name=name,
                    version=version,
                    round=round,
                    sha256=sha256,
                    **_inputs(features_sha256, preprocessing_sha256),
                )
            )
            record = ModelRecord(
                name=name,
                version=version,
                round=round,
                parent=head,
                sha256=sha256,
                blob=blob,
                state_blob=state_blob,
                created_at=created_at,
                status=status,
                architecture_version=architecture_version,
                metrics=dict(metrics or {}),
                signed=signed,
                features_sha256=features_sha256,
                preprocessing_sha256=preprocessing_sha256,
            )
            row = {field: getattr(record, field) for field in _INSERTED}
            row["metrics"] = encoded  # the text already made, not the dict encoded again
            if signed is not None:
                row |= {
                    "run_id": signed.run_id,
                    "signing_key_id": signed.key_id,
                    "signature": signed.signature,
                }
            insert_rows(connection, model_versions, [row])
            _move_head(connection, name, record.version, created_at)
            details = {"round": round, "parent": head, "sha256": sha256, "status": status.value}
            details["signing_key_id"] = None if signed is None else signed.key_id
            details["metrics_sha256"] = metrics_digest(metrics or {})
            if features_sha256 is not None:
                details["features_sha256"] = features_sha256
            if preprocessing_sha256 is not None:
                details["preprocessing_sha256"] = preprocessing_sha256
            self._audit(connection, "commit", name, version, details)
            return record  # as stored: no need to read it back

    def get(self, name: str, version: int) -> ModelRecord:
        """Version ``version`` of ``name`` (:class:`NotFoundError` when none)."""
        with self.database.read() as connection:
            return _fetch(connection, name, version)

    def list(self, name: str) -> builtins.list[ModelRecord]:
        """Every version of ``name``, oldest first (empty for an unknown name)."""
        query = _VERSIONS.where(model_versions.c.name == name).order_by(model_versions.c.version)
        with self.database.read() as connection:
            return [_record(row) for row in connection.execute(query)]

    def names(self) -> builtins.list[str]:
        """Every model with at least one version, sorted."""
        with self.database.read() as connection:
            return list(
                connection.execute(sa.select(model_heads.c.name).order_by(model_heads.c.name))
                .scalars()
                .all()
            )

    def head(self, name: str) -> ModelRecord | None:
        """The version new rounds of ``name`` build on, or None before the first commit."""
        with self.database.read() as connection:
            version = _head_version(connection, name)
            return None if version is None else _fetch(connection, name, version)

    def load(self, name: str, version: int) -> Parameters:
        """The parameters of a version, verified against the recorded sha256."""
        record = self.get(name, version)
        return Parameters.from_bytes(self.blobs.get(record.blob), expected_sha256=record.sha256)

    def load_state(self, name: str, version: int) -> bytes | None:
        """The opaque state stored with a version (verified), or None if it has none."""
        record = self.get(name, version)
        return None if record.state_blob is None else self.blobs.get(record.state_blob)

    def holds_signatures(self) -> bool:
        """Whether anything in the registry is signed: a version of any model, or the audit
        log's head. A registry made by a Shoal before signing holds neither."""
        with self.database.read() as connection:
            signed = sa.select(model_versions.c.version).where(
                model_versions.c.signature.is_not(None)
            )
            heads = sa.select(audit_heads.c.seq)
            return any(
                connection.execute(query.limit(1)).first() is not None for query in (signed, heads)
            )

    def sign(self, name: str, version: int, signer: VersionSigner) -> ModelRecord:
        """Sign a version committed unsigned (by a Shoal before signing), once its blob checks
        out; a signed version is returned as it is (a signature is never replaced)."""
        self.load(name, version)  # raises IntegrityError on a corrupt blob: never vouch for it
        with self.database.write() as connection:
            lock_name(connection, model_lock(name))
            record = _fetch(connection, name, version)
            if record.signed is not None:
                return record
            signed = signer(
                name=name,
                version=version,
                round=record.round,
                sha256=record.sha256,
                **_inputs(record.features_sha256, record.preprocessing_sha256),
            )
            connection.execute(
                sa.update(model_versions)
                .where(model_versions.c.name == name, model_versions.c.version == version)
                .values(
                    run_id=signed.run_id, signing_key_id=signed.key_id, signature=signed.signature
                )
            )
            return _fetch(connection, name, version)

    def mark(
        self,
        name: str,
        version: int,
        status: ModelStatus,
        *,
        reason: str | None = None,
        now: datetime | None = None,
    ) -> ModelRecord:
        """Record a verdict on a version, with its reason and time (a later one replaces it).

        Marking HEAD BAD does not move HEAD: roll back.
        """
        changed_at = require_aware(now or utc_now(), "now")
        with self.database.write() as connection:
            record = _fetch(connection, name, version)
            before = record.status
            if before is ModelStatus.BAD and (record.status_reason or "").startswith(SUPERSEDED):
                raise RegistryError(  # (a BAD re-mark would take the reason that keeps it)
                    f"version {version} of {name!r} was {SUPERSEDED}: its weights hold a "
                    "forgotten client's updates, and its verdict stays"
                )
            connection.execute(
                sa.update(model_versions)
                .where(model_versions.c.name == name, model_versions.c.version == version)
                .values(status=status, status_reason=reason, status_changed_at=changed_at)
            )
            details = {"from": before.value, "to": status.value, "reason": reason}
            self._audit(connection, "mark", name, version, details)
            return _fetch(connection, name, version)

    def rollback(
        self,
        name: str,
        to_version: int,
        *,
        reason: str | None = None,
        now: datetime | None = None,
    ) -> ModelRecord:
        """Move HEAD to ``to_version``, refusing a BAD version or one whose blob is corrupt.

        ``reason`` says why (an operator's words, or the playbook's triggers), in the audit log.
        """
        moved_at = require_aware(now or utc_now(), "now")
        _refuse_bad(self.get(name, to_version))
        self.load(name, to_version)  # raises IntegrityError on a corrupt blob
        with self.database.write() as connection:
            lock_name(connection, model_lock(name))
            record = _refuse_bad(_fetch(connection, name, to_version))  # marked meanwhile?
            previous = _head_version(connection, name)
            _move_head(connection, name, to_version, moved_at)
            details = {"from_version": previous, "to_version": to_version, "sha256": record.sha256}
            details["reason"] = reason
            self._audit(connection, "rollback", name, to_version, details)
            return record

    def _audit(
        self, connection: Connection, kind: str, name: str, version: int, details: dict[str, Any]
    ) -> None:
        """Record ``kind`` on a version in the caller's transaction (last: the audit lock)."""
        event = AuditEvent(kind=kind, subject=f"{name}@v{version}", details=details)
        self.audit.record(connection, [event])


def _refuse_bad(record: ModelRecord) -> ModelRecord:
    if record.status is ModelStatus.BAD:
        raise RegistryError(
            f"version {record.version} of {record.name} is marked BAD: not rolling back to it"
        )
    return record


def _fetch(connection: Connection, name: str, version: int) -> ModelRecord:
    row = connection.execute(
        _VERSIONS.where(model_versions.c.name == name, model_versions.c.version == version)
    ).first()
    if row is None:
        raise NotFoundError(f"model {name!r} has no version {version}")
    return _record(row)


# a version's row with its metrics as text, parsed by _stored_metrics: the JSON column's own
# parsing would raise from inside SQLAlchemy on a value that is not JSON
_VERSIONS: sa.Select[Any] = sa.select(
    *(column for column in model_versions.c if column.name != "metrics"),
    sa.cast(model_versions.c.metrics, sa.Text).label("metrics"),
)

# statements of every commit, built once: building one costs more than running it
_NEWEST = sa.select(sa.func.max(model_versions.c.version)).where(
    model_versions.c.name == sa.bindparam("name")
)
_HEAD = sa.select(model_heads.c.version).where(model_heads.c.name == sa.bindparam("name"))
_MOVE_HEAD = (
    sa.update(model_heads)
    .where(model_heads.c.name == sa.bindparam("head_name"))
    .values(version=sa.bindparam("head_version"), moved_at=sa.bindparam("head_moved_at"))
)


def _head_version(connection: Connection, name: str) -> int | None:
    version = connection.execute(_HEAD, {"name": name}).scalar()
    return None if version is None else int(version)


def _move_head(connection: Connection, name: str, version: int, moved_at: datetime) -> None:
    moved = connection.execute(
        _MOVE_HEAD, {"head_name": name, "head_version": version, "head_moved_at": moved_at}
    )
    if moved.rowcount == 0:
        connection.execute(
            model_heads.insert().values(name=name, version=version, moved_at=moved_at)
        )
