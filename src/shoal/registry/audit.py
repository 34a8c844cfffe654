"""The audit log: an append-only, hash-chained record of who changed what, with signed heads.

Each entry holds a sequence number (1, 2, 3... with no gap), a time (whole
Unix seconds, floored to the log's granularity), a kind (``enroll``,
``suspend``, ``commit``, ``mark``, ``rollback``...), an actor (``coordinator``,
``simulator``, or the operator's name), a subject (a client id, a model
version, a round, as text), details (a JSON object), the previous entry's
hash (64 zeros for the first) and its own hash.

The hash is the sha256 (lowercase hex) of the entry's **canonical
encoding**: the UTF-8 bytes of the JSON object

    {"actor": ..., "details": {...}, "kind": ..., "prev_hash": ...,
     "recorded_at": <int>, "seq": <int>, "subject": ...}

written with its keys (and every nested object's keys) sorted by code
point, no whitespace (separators ``,`` and ``:``), non-ASCII characters as
themselves, and no NaN or infinity (Python's ``json.dumps(value,
sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)``). The ``details`` column stores the canonical encoding
of the details object itself, so any change to a stored byte changes a
hash or breaks the encoding.

Appends are serialized: they run inside a write transaction that takes the
``audit`` lock (:func:`~shoal.registry.database.lock_name`; SQLite's write
lock already is one) and read the last entry, and ``seq`` is the primary
key, so two writers never fork the chain. :func:`append_entries` appends
inside the caller's transaction, so that an event and its entry commit
together; many entries go in one INSERT. A **signed head** is the
coordinator's Ed25519 signature over ``(seq, hash)`` of the last entry
(:func:`head_message`), made by a :class:`HeadSigner` the run layer gives
(this layer never holds a key). Checking the chain and the signatures is
:mod:`shoal.registry.audit_verify`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shoal.core.errors import RegistryError
from shoal.registry.database import Database, lock_name
from shoal.registry.rows import insert_rows
from shoal.registry.schema import audit_heads, audit_log

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first entry."""

HEAD_SIGNING_CONTEXT = b"shoal.v1/audit-head\x00"
"""Domain separation: a head signature is valid for an audit head and nothing else."""

AUDIT_LOCK = "audit"
MAX_KIND = 32
MAX_ACTOR = 128
MAX_SUBJECT = 256
DEFAULT_ACTOR = "coordinator"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEvent:
    """Something to record: its kind, subject and details (``actor`` None: the log's own)."""

    kind: str
    subject: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    actor: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One stored entry (see the module docstring for what its hash covers)."""

    seq: int
    recorded_at: int
    kind: str
    actor: str
    subject: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str

    @property
    def time(self) -> datetime:
        """``recorded_at`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.recorded_at, UTC)


@dataclass(frozen=True, slots=True)
class HeadSignature:
    """A signature over :func:`head_message`, and the id of the key that made it."""

    key_id: str
    signature: bytes = field(repr=False)


class HeadSigner(Protocol):
    """Signs the log's head (the coordinator's key; see :mod:`shoal.governance.model_signing`)."""

    def __call__(self, *, seq: int, hash: str) -> HeadSignature: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedHead:
    """A stored head signature: the entry it vouches for, by which key, and when."""

    seq: int
    hash: str
    key_id: str
    signature: bytes = field(repr=False)
    signed_at: int


_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)  # made once: json.dumps makes an encoder per call for any option not its default


def canonical_json(value: Any) -> str:
    """The canonical encoding (as text): sorted keys, no whitespace, no NaN."""
    return _CANONICAL.encode(value)


def metrics_digest(metrics: Mapping[str, Any]) -> str:
    """The sha256 of a version's metrics in canonical form: what its commit entry records,
    and ``shoal audit verify`` checks the stored row (read back as JSON) against."""
    return hashlib.sha256(canonical_json(metrics).encode()).hexdigest()


def entry_hash(
    *,
    seq: int,
    recorded_at: int,
    kind: str,
    actor: str,
    subject: str,
    details: Mapping[str, Any],
    prev_hash: str,
) -> str:
    """The sha256 of an entry's canonical encoding (lowercase hex)."""
    document = {
        "actor": actor,
        "details": details,
        "kind": kind,
        "prev_hash": prev_hash,
        "recorded_at": recorded_at,
        "seq": seq,
        "subject": subject,
    }
    return hashlib.sha256(canonical_json(document).encode("utf-8")).hexdigest()


def head_message(*, seq: int, hash: str) -> bytes:
    """The exact bytes a head signature covers: the context, seq (8 bytes, big-endian), the
    32 raw bytes of the entry's hash."""
    if len(hash) != 64:
        raise RegistryError(f"an audit hash has 64 hex digits, got {hash!r}")
    return HEAD_SIGNING_CONTEXT + struct.pack(">q", seq) + bytes.fromhex(hash)


def floor_time(moment: datetime, *, granularity_s: int) -> int:
    """``moment`` as whole Unix seconds, floored to a multiple of ``granularity_s``."""
    if moment.tzinfo is None:
        raise RegistryError(f"a naive datetime cannot be recorded: {moment!r}")
    seconds = math.floor(moment.timestamp())
    return seconds - seconds % granularity_s


def clean_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """``details`` as strict JSON: a non-finite float becomes its text, a tuple a list."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, Mapping):
            return {str(key): clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            items = sorted(value) if isinstance(value, set | frozenset) else value
            return [clean(item) for item in items]
        return value

    try:
        cleaned = clean(dict(details))
        canonical_json(cleaned)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"audit details must be JSON values: {exc}") from exc
    return dict(cleaned)


def _check_text(value: str, name: str, *, limit: int, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > limit or (not value and not empty):
        raise RegistryError(f"an audit {name} has {0 if empty else 1} to {limit} characters")
    return value


_TAIL = "shoal.audit.tail"  # connection.info key: (transaction, seq, hash) of the log's tail


# statements of every commit, built once: building one costs more than running it
_TAIL_QUERY = sa.select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
_SIGNED_HEAD = sa.select(audit_heads).where(audit_heads.c.seq == sa.bindparam("head_seq"))


def _last(connection: Connection) -> tuple[int, str]:
    """``(seq, hash)`` of the last entry. Read once per transaction: a round's records append
    several times in one, and no other writer appends while it holds the audit lock."""
    transaction = connection.get_transaction()
    cached = connection.info.get(_TAIL)
    if cached is not None and transaction is not None and cached[0] is transaction:
        return cached[1], cached[2]
    row = connection.execute(_TAIL_QUERY).first()
    tail = (0, GENESIS_HASH) if row is None else (int(row.seq), str(row.hash))
    _remember_tail(connection, *tail)
    return tail


def _remember_tail(connection: Connection, seq: int, hash: str) -> None:
    transaction = connection.get_transaction()
    if transaction is not None:
        connection.info[_TAIL] = (transaction, seq, hash)


def append_entries(
    connection: Connection,
    events: Sequence[AuditEvent],
    *,
    actor: str = DEFAULT_ACTOR,
    granularity_s: int = 1,
    now: datetime | None = None,
) -> list[AuditEntry]:
    """Append ``events`` in one INSERT inside the caller's write transaction (see the module
    docstring); ``actor`` stands for an event that names none."""
    if granularity_s < 1:
        raise RegistryError(
            f"the audit granularity is a whole number of seconds >= 1, got {granularity_s}"
        )
    if not events:
        return []
    recorded_at = floor_time(now or datetime.now(UTC), granularity_s=granularity_s)
    lock_name(connection, AUDIT_LOCK)  # taken last in every transaction: no lock-order cycle
    seq, prev_hash = _last(connection)
    entries = []
    for event in events:
        seq += 1
        fields: dict[str, Any] = {
            "seq": seq,
            "recorded_at": recorded_at,
            "kind": _check_text(event.kind, "kind", limit=MAX_KIND),
            "actor": _check_text(event.actor or actor, "actor", limit=MAX_ACTOR),
            "subject": _check_text(event.subject, "subject", limit=MAX_SUBJECT, empty=True),
            "details": clean_details(event.details),
            "prev_hash": prev_hash,
        }
        prev_hash = entry_hash(**fields)
        entries.append(AuditEntry(**fields, hash=prev_hash))
    insert_rows(connection, audit_log, [_row(entry) for entry in entries])
    _remember_tail(connection, seq, prev_hash)
    return entries


def _row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "recorded_at": entry.recorded_at,
        "kind": entry.kind,
        "actor": entry.actor,
        "subject": entry.subject,
        "details": canonical_json(entry.details),
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }


def entry_from_row(row: sa.Row[Any]) -> AuditEntry:
    """A stored entry as read (``details`` parsed); raises on a row that cannot be read."""
    return AuditEntry(
        seq=int(row.seq),
        recorded_at=int(row.recorded_at),
        kind=str(row.kind),
        actor=str(row.actor),
        subject=str(row.subject),
        details=json.loads(row.details),
        prev_hash=str(row.prev_hash),
        hash=str(row.hash),
    )


def head_from_row(row: sa.Row[Any]) -> SignedHead:
    return SignedHead(
        seq=int(row.seq),
        hash=str(row.hash),
        key_id=str(row.key_id),
        signature=bytes(row.signature),
        signed_at=int(row.signed_at),
    )


class AuditLog:
    """The audit log in ``database``: appends by ``actor``, times floored to ``granularity_s``.

    >>> log = AuditLog(database, actor="alice")  # doctest: +SKIP
    >>> log.append("unlearn", subject="client-7", details={"rounds": [3, 4]})  # doctest: +SKIP
    """

    def __init__(
        self, database: Database, *, actor: str = DEFAULT_ACTOR, granularity_s: int = 1
    ) -> None:
        self.database = database
        self.actor = _check_text(actor, "actor", limit=MAX_ACTOR)
        if granularity_s < 1:
            raise RegistryError(
                f"the audit granularity is a whole number of seconds >= 1, got {granularity_s}"
            )
        self.granularity_s = granularity_s

    def record(
        self, connection: Connection, events: Sequence[AuditEvent], *, now: datetime | None = None
    ) -> list[AuditEntry]:
        """Append ``events`` inside the caller's write transaction ``connection``."""
        return append_entries(
            connection, events, actor=self.actor, granularity_s=self.granularity_s, now=now
        )

    def append(
        self,
        kind: str,
        *,
        subject: str = "",
        details: Mapping[str, Any] | None = None,
        actor: str | None = None,
        now: datetime | None = None,
    ) -> AuditEntry:
        """Append one entry in a transaction of its own."""
        event = AuditEvent(kind=kind, subject=subject, details=details or {}, actor=actor)
        with self.database.write() as connection:
            return self.record(connection, [event], now=now)[0]

    def append_many(
        self, events: Sequence[AuditEvent], *, now: datetime | None = None
    ) -> list[AuditEntry]:
        """Append ``events`` in one transaction and one INSERT."""
        with self.database.write() as connection:
            return self.record(connection, events, now=now)

    def entries(
        self, *, kind: str | None = None, since_seq: int = 0, limit: int | None = None
    ) -> list[AuditEntry]:
        """Entries after ``since_seq`` (of ``kind``, when given), oldest first."""
        query = sa.select(audit_log).where(audit_log.c.seq > since_seq).order_by(audit_log.c.seq)
        if kind is not None:
            query = query.where(audit_log.c.kind == kind)
        if limit is not None:
            query = query.limit(limit)
        with self.database.read() as connection:
            return [entry_from_row(row) for row in connection.execute(query)]

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry (``(0, GENESIS_HASH)`` for an empty log)."""
        with self.database.read() as connection:
            return _last(connection)

    def heads(self) -> list[SignedHead]:
        """Every stored head signature, by seq."""
        with self.database.read() as connection:
            rows = connection.execute(sa.select(audit_heads).order_by(audit_heads.c.seq))
            return [head_from_row(row) for row in rows]

    def sign_head(self, signer: HeadSigner, *, now: datetime | None = None) -> SignedHead | None:
        """Sign the current head (None for an empty log); a seq already signed is kept."""
        signed_at = floor_time(now or datetime.now(UTC), granularity_s=self.granularity_s)
        with self.database.write() as connection:
            lock_name(connection, AUDIT_LOCK)
            seq, hash = _last(connection)
            if seq == 0:
                return None
            existing = connection.execute(_SIGNED_HEAD, {"head_seq": seq}).first()
            if existing is not None:
                return head_from_row(existing)
            signed = signer(seq=seq, hash=hash)
            head = SignedHead(
                seq=seq,
                hash=hash,
                key_id=signed.key_id,
                signature=signed.signature,
                signed_at=signed_at,
            )
            row = {
                "seq": seq,
                "hash": hash,
                "key_id": head.key_id,
                "signature": head.signature,
                "signed_at": signed_at,
            }
            insert_rows(connection, audit_heads, [row])
            return head


def audit_events(kind: str, items: Iterable[tuple[str, Mapping[str, Any]]]) -> list[AuditEvent]:
    """One event of ``kind`` per ``(subject, details)`` pair."""
    return [AuditEvent(kind=kind, subject=subject, details=details) for subject, details in items]
