"""The client registry: enrolled devices, their latest state, and batched heartbeat ingest.

A client id is checked on every write (:func:`shoal.core.check_client_id`:
1 to 128 of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit). A
client record holds what the seed's registry record holds (device class,
battery and WiFi, app version, last seen, eligibility with a rejection
reason) plus the runtime, model-architecture and feature-extractor versions,
idleness and free RAM (power, network, idleness and RAM stored as NULL when
the client did not report them), a status (:class:`ClientStatus`), an expiry, the client's Ed25519
public key and its ``sample_key``: a uniform random 63-bit integer drawn
at enrollment, which the selector walks to sample clients without scanning
the table (see :mod:`shoal.registry.selector`).

Heartbeats arrive far more often than anything else: they are written in
batches, one executemany per batch, by :meth:`ClientRegistry.record_heartbeats`
(fed by a :class:`~shoal.registry.heartbeats.HeartbeatBuffer`).
"""

from __future__ import annotations

import builtins
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from shoal.core.device import DeviceState
from shoal.core.errors import NotFoundError, RegistryError, SecurityError
from shoal.core.identifiers import check_client_id
from shoal.registry.audit import AuditEvent, AuditLog
from shoal.registry.database import ChangeMark, Database
from shoal.registry.schema import ClientStatus, UtcDateTime, clients
from shoal.registry.versioning import VERSION_COLUMNS, Component, Eligibility, version_key

PUBLIC_KEY_BYTES = 32  # an Ed25519 public key
SAMPLE_KEY_LIMIT = 2**63
TABLE = "clients"  # the table whose changes a registry's kept reads watch
PROFILES_KEPT = 65_536
"""The most profiles a registry keeps between changes of the clients table (a fleet of a
million devices would otherwise keep every one it ever read)."""

_TRANSITIONS: dict[ClientStatus, frozenset[ClientStatus]] = {
    ClientStatus.ACTIVE: frozenset(ClientStatus),
    ClientStatus.SUSPENDED: frozenset(ClientStatus),
    ClientStatus.RETIRED: frozenset({ClientStatus.RETIRED}),
}


def utc_now() -> datetime:
    return datetime.now(UTC)


def coarsen(moment: datetime, *, granularity_s: int) -> datetime:
    """``moment`` floored to a multiple of ``granularity_s`` seconds since the epoch (UTC):
    how stored telemetry keeps times (``[metadata] timestamp_granularity_s``)."""
    if granularity_s < 1:
        raise RegistryError(f"a timestamp granularity is at least 1 s, got {granularity_s}")
    if granularity_s == 1:
        return moment
    seconds = int(moment.timestamp()) // granularity_s * granularity_s
    return datetime.fromtimestamp(seconds, tz=UTC)


def require_aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise RegistryError(f"{name} must be a timezone-aware datetime, got {moment!r}")
    return moment


def _require_fraction(value: float, name: str) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise RegistryError(f"{name} must lie in [0, 1], got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """A client's periodic sign of life: when it was seen, its power, network, idleness and
    free memory.

    A fact the client did not report is None (unknown), and is stored so.
    """

    client_id: str
    seen_at: datetime
    battery_level: float | None
    charging: bool | None
    wifi: bool | None
    idle: bool | None = None
    ram_gb: float | None = None

    def __post_init__(self) -> None:
        check_client_id(self.client_id, error=RegistryError)
        require_aware(self.seen_at, "seen_at")
        if self.battery_level is not None:
            _require_fraction(self.battery_level, "battery_level")
        if self.ram_gb is not None and not (math.isfinite(self.ram_gb) and self.ram_gb >= 0):
            raise RegistryError(f"ram_gb must be a finite number >= 0, got {self.ram_gb!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRecord:
    """One enrolled client, as the registry holds it."""

    client_id: str
    device: DeviceState
    status: ClientStatus
    status_reason: str | None
    eligibility: Eligibility
    public_key: bytes | None
    sample_key: int
    enrolled_at: datetime
    last_seen: datetime
    expires_at: datetime | None

    @property
    def app_version(self) -> str:
        return self.device.app_version

    @property
    def runtime_version(self) -> str:
        return self.device.runtime_version

    @property
    def model_architecture_version(self) -> str:
        return self.device.model_architecture_version

    @property
    def feature_extractor_version(self) -> str | None:
        return self.device.feature_extractor_version

    def barred_reasons(self, *, now: datetime) -> builtins.list[str]:
        """Why the client may not train whatever it reports: not ACTIVE, or expired."""
        reasons = []
        if self.status is not ClientStatus.ACTIVE:
            detail = f": {self.status_reason}" if self.status_reason else ""
            reasons.append(f"client is {self.status.value.lower()}{detail}")
        if self.expires_at is not None and self.expires_at <= now:
            reasons.append(f"enrollment expired at {self.expires_at.isoformat()}")
        return reasons

    def current_eligibility(self, *, now: datetime | None = None) -> Eligibility:
        """Whether the client may train now: never while suspended, retired or expired;
        otherwise the verdict it was last told (:attr:`eligibility`)."""
        reasons = self.barred_reasons(now=require_aware(now or utc_now(), "now"))
        return Eligibility.rejected(reasons) if reasons else self.eligibility


@dataclass(frozen=True, slots=True)
class ClientProfile:
    """What a decision on a client's update reads of its record (:meth:`ClientRegistry.profiles`):
    its status, device class and versions, without its timestamps or device state."""

    client_id: str
    status: ClientStatus
    device_class: str
    app_version: str
    runtime_version: str
    model_architecture_version: str
    feature_extractor_version: str | None


def device_columns(device: DeviceState) -> dict[str, Any]:
    """The clients-table columns that hold ``device``, version keys included."""
    columns: dict[str, Any] = {
        "device_class": device.device_class,
        "battery_level": device.battery_level,
        "charging": device.charging,
        "wifi": device.wifi,
        "ram_gb": device.ram_gb,
        "idle": device.idle,
    }
    for component in Component:
        version = getattr(device, component.column)
        columns[component.column] = version
        columns[f"{component.column}_key"] = None if version is None else version_key(version)
    return columns


def _flag(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _printable(text: str) -> str:
    """A stored device text, its control characters as U+FFFD: a registry written before
    such texts had to be printable still reads."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


# statements read every round, built once: building one costs more than running it
_BARRED = sa.select(clients.c.client_id).where(clients.c.status != ClientStatus.ACTIVE)
_WANTED = clients.c.client_id.in_(sa.bindparam("wanted", expanding=True))
_RECORDS = sa.select(clients).where(_WANTED)
# a profile's fields, in order: its rows are unpacked, not read column by column by name
_PROFILES = sa.select(*(clients.c[f.name] for f in fields(ClientProfile))).where(_WANTED)


def record_from_row(row: sa.Row[Any]) -> ClientRecord:
    device = DeviceState(
        device_class=_printable(row.device_class),
        battery_level=row.battery_level,
        charging=_flag(row.charging),
        wifi=_flag(row.wifi),
        ram_gb=row.ram_gb,
        idle=_flag(row.idle),
        **_versions(row),
    )
    return ClientRecord(
        client_id=row.client_id,
        device=device,
        status=row.status,
        status_reason=row.status_reason,
        eligibility=Eligibility(bool(row.can_train), row.rejection_reason),
        public_key=None if row.public_key is None else bytes(row.public_key),
        sample_key=int(row.sample_key),
        enrolled_at=row.enrolled_at,
        last_seen=row.last_seen,
        expires_at=row.expires_at,
    )


def profile_from_row(row: Sequence[Any]) -> ClientProfile:
    """A row of ``_PROFILES``, whose columns are the profile's fields in order (a row read by
    position: by name, each field cost a lookup, a third of a 100-client read)."""
    client_id, status, device_class, *versions = row
    printable: list[Any] = [None if v is None else _printable(v) for v in versions]
    return ClientProfile(client_id, status, _printable(device_class), *printable)


def _versions(row: sa.Row[Any]) -> dict[str, Any]:
    """A row's component versions, as printable texts (None where the client reported none)."""
    versions: dict[str, Any] = {}
    for column in VERSION_COLUMNS:
        version = getattr(row, column)
        versions[column] = None if version is None else _printable(version)
    return versions


_HEARTBEAT_UPDATE = (
    sa.update(clients)
    .where(
        clients.c.client_id == sa.bindparam("b_client_id"),
        # an out-of-order heartbeat never rolls a client's state back
        clients.c.last_seen <= sa.bindparam("b_seen_at", type_=UtcDateTime),
    )
    .values(
        battery_level=sa.bindparam("b_battery_level"),
        charging=sa.bindparam("b_charging"),
        wifi=sa.bindparam("b_wifi"),
        idle=sa.bindparam("b_idle"),
        ram_gb=sa.bindparam("b_ram_gb"),
        last_seen=sa.bindparam("b_seen_at", type_=UtcDateTime),
    )
)


_STATUS_KINDS = {
    ClientStatus.SUSPENDED: "suspend",
    ClientStatus.ACTIVE: "reinstate",
    ClientStatus.RETIRED: "retire",
}


class ClientRegistry:
    """Every enrolled client: enrollment, status, heartbeats and listings.

    ``seed`` fixes the sample keys drawn at enrollment (for reproducible
    tests); by default they come from fresh OS entropy.

    A run asks for the barred clients and for the profiles of a round's
    clients every round, and they seldom change. On SQLite the registry
    keeps its latest read of each with the database's change mark
    (:meth:`~shoal.registry.database.Database.change_mark`) and serves it
    again while the mark is the same: no other connection committed, and
    this process changed no client (enrollments and status changes mark the
    table as changed). On PostgreSQL every call reads.
    """

    def __init__(
        self, database: Database, *, seed: int | None = None, audit: AuditLog | None = None
    ) -> None:
        self.database = database
        self.audit = AuditLog(database) if audit is None else audit  # enrollments, statuses
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        # the latest reads of the barred clients and of profiles, each with the database's
        # change mark taken before it (see the class docstring)
        self._barred: tuple[ChangeMark, frozenset[str]] | None = None
        self._profiles: tuple[ChangeMark, dict[str, ClientProfile | None]] | None = None

    def new_sample_key(self) -> int:
        with self._rng_lock:
            return int(self._rng.integers(0, SAMPLE_KEY_LIMIT, dtype=np.int64))

    def enroll(
        self,
        client_id: str,
        device: DeviceState,
        *,
        now: datetime | None = None,
        public_key: bytes | None = None,
        expires_at: datetime | None = None,
    ) -> ClientRecord:
        """Enroll a client, or refresh an enrolled one (idempotent).

        Re-enrolling updates the device state and ``last_seen`` and, when
        given, the expiry; it keeps the status, the enrollment time and the
        sample key. A retired client cannot come back, and a client enrolled
        with a public key cannot change it (:class:`SecurityError`).
        """
        check_client_id(client_id, error=RegistryError)
        now = require_aware(now or utc_now(), "now")
        if expires_at is not None:
            require_aware(expires_at, "expires_at")
        if public_key is not None and len(public_key) != PUBLIC_KEY_BYTES:
            raise RegistryError(
                f"a public key must be {PUBLIC_KEY_BYTES} bytes (Ed25519), got {len(public_key)}"
            )
        with self.database.write() as connection:
            self.database.changed(TABLE)
            inserted = connection.execute(
                _insert_if_absent(connection)
                .values(
                    client_id=client_id,
                    **device_columns(device),
                    status=ClientStatus.ACTIVE,
                    can_train=True,
                    public_key=public_key,
                    sample_key=self.new_sample_key(),
                    enrolled_at=now,
                    last_seen=now,
                    expires_at=expires_at,
                )
                .returning(clients.c.client_id)
            )
            if inserted.first() is not None:
                details = {"device_class": device.device_class, "keyed": public_key is not None}
                self.audit.record(
                    connection, [AuditEvent(kind="enroll", subject=client_id, details=details)]
                )
            else:
                existing = _fetch(connection, client_id)
                _check_reenrollment(existing, public_key)
                changes = device_columns(device) | {"last_seen": max(now, existing.last_seen)}
                if expires_at is not None:
                    changes["expires_at"] = expires_at
                if existing.public_key is None and public_key is not None:
                    changes["public_key"] = public_key
                connection.execute(_by_id(client_id).values(**changes))
            return _fetch(connection, client_id)

    def enroll_population(
        self, devices: Mapping[str, DeviceState], *, now: datetime | None = None
    ) -> int:
        """Enroll every client of ``devices`` not enrolled yet, in one transaction.

        Clients already enrolled keep their record untouched (status
        included): a simulated fleet enrolled again on resume keeps the
        suspensions an operator made. Returns how many were new.
        """
        now = require_aware(now or utc_now(), "now")
        for client_id in devices:
            check_client_id(client_id, error=RegistryError)
        rows = [
            {
                "client_id": client_id,
                **device_columns(device),
                "status": ClientStatus.ACTIVE,
                "can_train": True,
                "public_key": None,
                "sample_key": self.new_sample_key(),
                "enrolled_at": now,
                "last_seen": now,
                "expires_at": None,
            }
            # sorted: concurrent bulk enrollments take their key locks in one order
            for client_id, device in sorted(devices.items())
        ]
        if not rows:
            return 0
        with self.database.write() as connection:
            self.database.changed(TABLE)
            inserted = connection.execute(
                _insert_if_absent(connection).returning(clients.c.client_id), rows
            )
            new = sorted(inserted.scalars())
            if new:  # one entry for the whole batch
                details = {"count": len(new), "clients": new}
                event = AuditEvent(kind="enroll", subject=f"{len(new)} clients", details=details)
                self.audit.record(connection, [event])
            return len(new)

    def barred(self) -> set[str]:
        """The ids of every client that is not ACTIVE (suspended or retired)."""
        mark = self.database.change_mark(TABLE)
        kept = self._barred
        if mark is not None and kept is not None and kept[0] == mark:
            return set(kept[1])
        with self.database.read() as connection:
            barred = {row.client_id for row in connection.execute(_BARRED)}
        if mark is not None:
            self._barred = (mark, frozenset(barred))
        return barred

    def get(self, client_id: str) -> ClientRecord:
        """The record of ``client_id`` (:class:`NotFoundError` when none)."""
        with self.database.read() as connection:
            return _fetch(connection, client_id)

    def records(self, client_ids: Sequence[str]) -> dict[str, ClientRecord]:
        """The records of those of ``client_ids`` that are enrolled, in one query."""
        wanted = sorted(set(client_ids))
        if not wanted:
            return {}
        with self.database.read() as connection:
            rows = connection.execute(_RECORDS, {"wanted": wanted})
            return {row.client_id: record_from_row(row) for row in rows}

    def profiles(self, client_ids: Sequence[str]) -> dict[str, ClientProfile]:
        """The profiles of those of ``client_ids`` that are enrolled, in one query: a record's
        columns that a decision on an update reads (no timestamp to parse)."""
        wanted = sorted(set(client_ids))
        if not wanted:
            return {}
        mark = self.database.change_mark(TABLE)
        kept = self._profiles
        known: dict[str, ClientProfile | None] = {}
        if mark is not None and kept is not None and kept[0] == mark:
            known = kept[1]
        missing = [client_id for client_id in wanted if client_id not in known]
        if missing:
            with self.database.read() as connection:
                rows = connection.execute(_PROFILES, {"wanted": missing}).all()
            read = {row[0]: profile_from_row(row) for row in rows}
            if mark is not None:
                if len(known) + len(missing) > PROFILES_KEPT:
                    known = {}
                known.update({client_id: read.get(client_id) for client_id in missing})
                self._profiles = (mark, known)
            else:
                known = {**read}
        return {
            client_id: profile
            for client_id in wanted
            if (profile := known.get(client_id)) is not None
        }

    def list(
        self,
        *,
        status: ClientStatus | None = None,
        device_class: str | None = None,
        seen_since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> builtins.list[ClientRecord]:
        """Clients matching every given filter, ordered by id, one page at a time."""
        if limit < 0 or offset < 0:
            raise RegistryError(f"limit and offset must be >= 0, got {limit} and {offset}")
        query = sa.select(clients).order_by(clients.c.client_id).limit(limit).offset(offset)
        if status is not None:
            query = query.where(clients.c.status == status)
        if device_class is not None:
            query = query.where(clients.c.device_class == device_class)
        if seen_since is not None:
            query = query.where(clients.c.last_seen >= require_aware(seen_since, "seen_since"))
        with self.database.read() as connection:
            return [record_from_row(row) for row in connection.execute(query)]

    def count(
        self, *, status: ClientStatus | None = None, seen_since: datetime | None = None
    ) -> int:
        """How many clients are enrolled (with ``status``, seen since ``seen_since``, when
        given)."""
        query = sa.select(sa.func.count()).select_from(clients)
        if status is not None:
            query = query.where(clients.c.status == status)
        if seen_since is not None:
            query = query.where(clients.c.last_seen >= require_aware(seen_since, "seen_since"))
        with self.database.read() as connection:
            return int(connection.execute(query).scalar_one())

    def census(self) -> dict[tuple[ClientStatus, str | None], int]:
        """How many clients each (status, device class) pair holds (a class None: unreported)."""
        query = sa.select(clients.c.status, clients.c.device_class, sa.func.count()).group_by(
            clients.c.status, clients.c.device_class
        )
        with self.database.read() as connection:
            return {
                (ClientStatus(status), device_class): int(count)
                for status, device_class, count in connection.execute(query)
            }

    def set_status(
        self, client_id: str, status: ClientStatus, reason: str | None = None
    ) -> ClientRecord:
        """Suspend, resume or retire a client; retirement is final."""
        with self.database.write() as connection:
            self.database.changed(TABLE)
            current = _fetch(connection, client_id).status
            if status not in _TRANSITIONS[current]:
                raise RegistryError(
                    f"client {client_id} is {current.value}: it cannot become {status.value}"
                )
            connection.execute(_by_id(client_id).values(status=status, status_reason=reason))
            details = {"from": current.value, "to": status.value, "reason": reason}
            event = AuditEvent(kind=_STATUS_KINDS[status], subject=client_id, details=details)
            self.audit.record(connection, [event])
            return _fetch(connection, client_id)

    def record_eligibility(self, client_id: str, eligibility: Eligibility) -> None:
        """Keep the verdict a client was last told (shown to operators)."""
        with self.database.write() as connection:
            result = connection.execute(
                _by_id(client_id).values(
                    can_train=eligibility.can_train, rejection_reason=eligibility.reason
                )
            )
            if result.rowcount == 0:
                raise NotFoundError(f"no client {client_id!r} is enrolled")

    def record_heartbeats(self, batch: Sequence[Heartbeat]) -> int:
        """Write a batch of heartbeats in one statement; returns how many rows changed.

        Heartbeats of unknown clients and heartbeats older than the client's
        ``last_seen`` change nothing. Of several heartbeats of one client in
        the batch, the latest wins.
        """
        latest: dict[str, Heartbeat] = {}
        for heartbeat in batch:
            kept = latest.get(heartbeat.client_id)
            if kept is None or heartbeat.seen_at >= kept.seen_at:
                latest[heartbeat.client_id] = heartbeat
        if not latest:
            return 0
        # rows are locked in client-id order, so two concurrent batches that
        # share clients queue behind each other instead of deadlocking
        parameters = [
            {
                "b_client_id": heartbeat.client_id,
                "b_seen_at": heartbeat.seen_at,
                "b_battery_level": heartbeat.battery_level,
                "b_charging": heartbeat.charging,
                "b_wifi": heartbeat.wifi,
                "b_idle": heartbeat.idle,
                "b_ram_gb": heartbeat.ram_gb,
            }
            for _, heartbeat in sorted(latest.items())
        ]
        with self.database.write() as connection:
            return connection.execute(_HEARTBEAT_UPDATE, parameters).rowcount


def _by_id(client_id: str) -> sa.Update:
    return sa.update(clients).where(clients.c.client_id == client_id)


def _fetch(connection: Connection, client_id: str) -> ClientRecord:
    row = connection.execute(sa.select(clients).where(clients.c.client_id == client_id)).first()
    if row is None:
        raise NotFoundError(f"no client {client_id!r} is enrolled")
    return record_from_row(row)


def _insert_if_absent(connection: Connection) -> Any:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(clients).on_conflict_do_nothing(index_elements=["client_id"])


def _check_reenrollment(existing: ClientRecord, public_key: bytes | None) -> None:
    if existing.status is ClientStatus.RETIRED:
        raise RegistryError(f"client {existing.client_id} is retired: enroll it under a new id")
    if existing.public_key is not None and public_key not in (None, existing.public_key):
        raise SecurityError(
            f"client {existing.client_id} is enrolled with another public key; "
            "retire it and enroll a new id to change keys"
        )
