"""The attestation allow-list: which client builds the operator admits, and who said so.

A build is what a client's attestation proves it runs: for the built-in
``manifest`` kind, a release manifest, known by its sha256 (the build id).
An operator allows a build (``shoal attest allow``) and may later revoke it
(``shoal attest revoke``); each decision keeps who made it, when, and why.
A revocation is final: the build stays revoked, and a fixed build is a new
release with a new id. The coordinator reads the list at every enrollment
and check-in, so a revocation takes effect at each client's next check-in,
without a restart.

>>> builds = AllowedBuilds(database)  # doctest: +SKIP
>>> builds.allow(build_id=manifest_id, kind="manifest", label="v2.1", by="ana",
...              reason="release 2.1 passed QA")  # doctest: +SKIP
>>> builds.revoke(manifest_id[:12], by="ana", reason="CVE-2026-1234")  # doctest: +SKIP
"""

from __future__ import annotations

import builtins
import enum
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from shoal.core.errors import NotFoundError, RegistryError
from shoal.registry.clients import require_aware, utc_now
from shoal.registry.database import Database, lock_name
from shoal.registry.schema import UtcDateTime, attestation_allow_list

MAX_BUILD_ID_CHARS = 128
MIN_PREFIX_CHARS = 8
_BUILD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+/=-]{0,127}")
_MAX_WHO = 128
_MAX_REASON = 1000


class BuildState(enum.Enum):
    """Whether the coordinator admits clients of a build listed here."""

    ALLOWED = "ALLOWED"
    REVOKED = "REVOKED"


@dataclass(frozen=True, slots=True, kw_only=True)
class AllowedBuild:
    """One build on the allow-list, with who allowed it (and revoked it), when and why."""

    build_id: str
    kind: str
    label: str
    allowed_by: str
    allowed_at: datetime
    allowed_reason: str
    revoked_by: str | None = None
    revoked_at: datetime | None = None
    revoked_reason: str | None = None

    @property
    def state(self) -> BuildState:
        return BuildState.ALLOWED if self.revoked_at is None else BuildState.REVOKED


def _record(row: sa.Row[Any]) -> AllowedBuild:
    return AllowedBuild(
        build_id=row.build_id,
        kind=row.kind,
        label=row.label,
        allowed_by=row.allowed_by,
        allowed_at=row.allowed_at,
        allowed_reason=row.allowed_reason,
        revoked_by=row.revoked_by,
        revoked_at=row.revoked_at,
        revoked_reason=row.revoked_reason,
    )


def check_build_id(build_id: str) -> str:
    """``build_id`` when it is one (1 to 128 characters of a digest or a token's alphabet)."""
    if not isinstance(build_id, str) or not _BUILD_ID.fullmatch(build_id):
        raise RegistryError(f"not a build id: {str(build_id)[:40]!r}")
    return build_id


def _check_decision(by: str, reason: str) -> None:
    if not by.strip() or len(by) > _MAX_WHO or not by.isprintable():
        raise RegistryError(f"who decided is 1 to {_MAX_WHO} printable characters, got {by!r}")
    if not reason.strip() or len(reason) > _MAX_REASON or not reason.isprintable():
        raise RegistryError(f"a reason is 1 to {_MAX_REASON} printable characters (one line)")


class AllowedBuilds:
    """The allow-list held in ``database``: allow, revoke, look up, list."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def allow(
        self,
        *,
        build_id: str,
        kind: str,
        label: str = "",
        by: str,
        reason: str,
        now: datetime | None = None,
    ) -> AllowedBuild:
        """Admit clients of ``build_id``; returns its entry.

        Allowing an allowed build changes nothing (the first decision
        stands); allowing a revoked one is a :class:`RegistryError`.
        """
        check_build_id(build_id)
        _check_decision(by, reason)
        if not 0 < len(kind) <= 64:
            raise RegistryError(f"an attestation kind has 1 to 64 characters, got {kind!r}")
        now = require_aware(now or utc_now(), "now")
        table = attestation_allow_list
        with self.database.write() as connection:
            lock_name(connection, "attestation allow-list")
            row = connection.execute(sa.select(table).where(table.c.build_id == build_id)).first()
            if row is None:
                connection.execute(
                    table.insert().values(
                        build_id=build_id,
                        kind=kind,
                        label=label[:256],
                        allowed_by=by,
                        allowed_at=now,
                        allowed_reason=reason,
                    )
                )
                row = connection.execute(sa.select(table).where(table.c.build_id == build_id)).one()
        entry = _record(row)
        if entry.state is BuildState.REVOKED:
            raise RegistryError(
                f"build {build_id[:16]} was revoked by {entry.revoked_by} at "
                f"{entry.revoked_at:%Y-%m-%d %H:%M:%S} UTC ({entry.revoked_reason}): "
                "a revocation is final, release a new build"
            )
        return entry

    def revoke(
        self, build_id: str, *, by: str, reason: str, now: datetime | None = None
    ) -> AllowedBuild:
        """Refuse clients of a build from their next request on (a unique id prefix will do).

        Revoking twice keeps the first revocation.
        """
        _check_decision(by, reason)
        now = require_aware(now or utc_now(), "now")
        full_id = self.find(build_id).build_id
        table = attestation_allow_list
        with self.database.write() as connection:
            row = connection.execute(
                sa.update(table)
                .where(table.c.build_id == full_id)
                .values(
                    revoked_at=sa.func.coalesce(table.c.revoked_at, sa.literal(now, UtcDateTime())),
                    revoked_by=sa.func.coalesce(table.c.revoked_by, by),
                    revoked_reason=sa.func.coalesce(table.c.revoked_reason, reason),
                )
                .returning(*table.c)
            ).one()
        return _record(row)

    def get(self, build_id: str) -> AllowedBuild | None:
        """The entry of exactly ``build_id``, or None when it was never allowed."""
        table = attestation_allow_list
        with self.database.read() as connection:
            row = connection.execute(sa.select(table).where(table.c.build_id == build_id)).first()
        return None if row is None else _record(row)

    def find(self, prefix: str) -> AllowedBuild:
        """The one entry whose id is ``prefix`` or starts with it (at least 8 characters)."""
        check_build_id(prefix)
        exact = self.get(prefix)
        if exact is not None:
            return exact
        if len(prefix) < MIN_PREFIX_CHARS:
            raise NotFoundError(f"no allowed build {prefix!r} (give at least 8 characters)")
        table = attestation_allow_list
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self.database.read() as connection:
            rows = connection.execute(
                sa.select(table).where(table.c.build_id.like(f"{escaped}%", escape="\\")).limit(2)
            ).all()
        if not rows:
            raise NotFoundError(f"no allowed build {prefix!r}")
        if len(rows) > 1:
            raise NotFoundError(f"{prefix!r} names more than one build: give more characters")
        return _record(rows[0])

    def list(self) -> builtins.list[AllowedBuild]:
        """Every entry, revoked ones included, oldest first."""
        table = attestation_allow_list
        query = sa.select(table).order_by(table.c.allowed_at, table.c.build_id)
        with self.database.read() as connection:
            return [_record(row) for row in connection.execute(query)]
