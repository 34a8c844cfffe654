"""Enrollment tokens: short-lived secrets, each good for a set number of client enrollments.

An operator issues a token (``shoal clients enroll``) and hands it to the
client out of band; the coordinator redeems it when that client enrolls.
Only the token's sha256 is stored, so a copy of the database enrolls no
one. A token may be bound to one client id, expires at a fixed time, and
carries a number of uses; :meth:`EnrollmentTokens.redeem` consumes one use
in a single conditional ``UPDATE``, so two clients racing for the last use
cannot both win, on SQLite or PostgreSQL.

Each token has a public ``token_id`` (the first 16 hex digits of its
sha256) by which an operator lists and revokes it without ever seeing the
secret again.

The tokens written in the coordinator's config (``coordinator.enrollment_tokens``)
are stored the same way, marked :attr:`TokenOrigin.CONFIG`, so that one
conditional ``UPDATE`` counts their uses too: at each start,
:meth:`EnrollmentTokens.sync_listed` adds a newly listed one, applies the
config's ``max_uses`` and expiry to one already stored (the uses taken so
far stay taken; a time-to-live runs from when the token was first listed),
and expires, as of that start, every config token no longer listed.

>>> tokens = EnrollmentTokens(database)  # doctest: +SKIP
>>> token = tokens.issue(client_id="hospital-7", expires_in=timedelta(days=7))  # doctest: +SKIP
>>> tokens.redeem(token, client_id="hospital-7").uses_left  # doctest: +SKIP
0
"""

from __future__ import annotations

import builtins
import enum
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shoal.core.errors import NotFoundError, RegistryError, SecurityError
from shoal.core.identifiers import check_client_id
from shoal.registry.clients import require_aware, utc_now
from shoal.registry.database import Database, lock_name
from shoal.registry.schema import TokenOrigin, UtcDateTime, enrollment_tokens

TOKEN_BYTES = 24  # 192 bits from the OS's CSPRNG, 32 URL-safe characters
TOKEN_ID_DIGITS = 16
MAX_TOKEN_CHARS = 256
# a token in a config file is a shared secret that leaks more easily than one handed out once:
# by default it enrolls at most 100 clients, within 7 days of the first start that lists it
LISTED_TOKEN_USES = 100
LISTED_TOKEN_TTL = timedelta(days=7)  # anything longer is not one of ours; it is not even hashed


class TokenState(enum.Enum):
    """Whether a token can still enroll a client, and if not, why."""

    ACTIVE = "ACTIVE"
    EXPIRED = "EXPIRED"
    USED_UP = "USED_UP"
    REVOKED = "REVOKED"


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrollmentToken:
    """What the registry knows of a token: everything but the secret itself."""

    token_id: str
    client_id: str | None  # None: any client id may redeem it
    uses: int
    uses_left: int
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    last_used_by: str | None
    origin: TokenOrigin = TokenOrigin.ISSUED

    def state(self, now: datetime | None = None) -> TokenState:
        """Revoked, expired, used up, or still active at ``now``."""
        if self.revoked_at is not None:
            return TokenState.REVOKED
        if self.expires_at <= require_aware(now or utc_now(), "now"):
            return TokenState.EXPIRED
        if self.uses_left <= 0:
            return TokenState.USED_UP
        return TokenState.ACTIVE


def token_sha256(token: str) -> str:
    """The stored form of a token: the sha256 of its UTF-8 bytes, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_id_of(token: str) -> str:
    """The public id of a token (what ``list`` shows and ``revoke`` takes)."""
    return token_sha256(token)[:TOKEN_ID_DIGITS]


def _record(row: sa.Row[Any]) -> EnrollmentToken:
    return EnrollmentToken(
        token_id=row.token_id,
        client_id=row.client_id,
        uses=row.uses,
        uses_left=row.uses_left,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        last_used_by=row.last_used_by,
        origin=row.origin,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ListedToken:
    """A token the coordinator's config lists: the secret, its uses and its expiry.

    ``expires_at`` is a fixed time; without it the token expires ``ttl``
    after it was first listed (first stored in this registry).
    """

    token: str = field(repr=False)  # a secret: never in a repr, a log line or an error
    max_uses: int = LISTED_TOKEN_USES
    ttl: timedelta = LISTED_TOKEN_TTL
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        if not 0 < len(self.token) <= MAX_TOKEN_CHARS:
            raise RegistryError(f"a listed token has 1 to {MAX_TOKEN_CHARS} characters")
        if self.max_uses < 1:
            raise RegistryError(f"a listed token needs at least one use, got {self.max_uses}")
        if self.ttl <= timedelta(0):
            raise RegistryError(f"a listed token's ttl must be positive, got {self.ttl}")
        if self.expires_at is not None:
            require_aware(self.expires_at, "expires_at")

    def expiry(self, first_listed: datetime) -> datetime:
        """When the token expires, had it been first listed at ``first_listed``."""
        if self.expires_at is not None:
            return self.expires_at
        try:
            return first_listed + self.ttl
        except OverflowError:
            raise RegistryError(f"a listed token's ttl is too long: {self.ttl}") from None


def _check_client_id(client_id: str) -> None:
    check_client_id(client_id, error=RegistryError)


class EnrollmentTokens:
    """The enrollment tokens held in ``database``: issue, redeem, list, revoke."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def issue(
        self,
        *,
        client_id: str | None = None,
        expires_in: timedelta,
        uses: int = 1,
        now: datetime | None = None,
    ) -> str:
        """A new token good for ``uses`` enrollments within ``expires_in``; shown only here.

        With ``client_id``, only that client id can redeem it.
        """
        if client_id is not None:
            _check_client_id(client_id)
        if uses < 1:
            raise RegistryError(f"a token needs at least one use, got {uses}")
        if expires_in <= timedelta(0):
            raise RegistryError(f"expires_in must be positive, got {expires_in}")
        created_at = require_aware(now or utc_now(), "now")
        try:
            expires_at = created_at + expires_in
        except OverflowError:
            raise RegistryError(f"expires_in is too long: {expires_in}") from None
        token = secrets.token_urlsafe(TOKEN_BYTES)
        digest = token_sha256(token)
        with self.database.write() as connection:
            connection.execute(
                enrollment_tokens.insert().values(
                    token_id=digest[:TOKEN_ID_DIGITS],
                    token_sha256=digest,
                    client_id=client_id,
                    uses=uses,
                    uses_left=uses,
                    created_at=created_at,
                    expires_at=expires_at,
                )
            )
        return token

    def redeem(self, token: str, *, client_id: str, now: datetime | None = None) -> EnrollmentToken:
        """Consume one use of ``token`` for ``client_id``; returns the token as it is now.

        Raises :class:`SecurityError`, naming the reason, when the token is
        unknown, revoked, expired, used up or bound to another client id;
        nothing is consumed then.
        """
        digest, now = _digest_of(token, client_id=client_id, now=now)
        table = enrollment_tokens
        consume = (
            sa.update(table)
            .where(*_redeemable(digest, client_id=client_id, now=now))
            .values(uses_left=table.c.uses_left - 1, last_used_at=now, last_used_by=client_id)
            .returning(*table.c)
        )
        with self.database.write() as connection:
            row = connection.execute(consume).first()
            if row is None:
                raise _refusal(connection, digest, client_id=client_id, now=now)
            return _record(row)

    def check(self, token: str, *, client_id: str, now: datetime | None = None) -> None:
        """Whether :meth:`redeem` would take ``token`` for ``client_id`` now, using nothing:
        raises what it would raise. (A use can still be gone by the time it redeems.)"""
        digest, now = _digest_of(token, client_id=client_id, now=now)
        query = sa.select(enrollment_tokens.c.token_sha256).where(
            *_redeemable(digest, client_id=client_id, now=now)
        )
        with self.database.read() as connection:
            if connection.execute(query).first() is None:
                raise _refusal(connection, digest, client_id=client_id, now=now)

    def sync_listed(
        self, listed: Sequence[ListedToken], *, now: datetime | None = None
    ) -> builtins.list[EnrollmentToken]:
        """Make the stored CONFIG tokens what ``listed`` says, as of ``now``; returns them.

        A token listed twice, or the secret of an issued token, is a
        :class:`RegistryError` and nothing changes. Concurrent starts on one
        registry apply one after the other.
        """
        now = require_aware(now or utc_now(), "now")
        digests = [token_sha256(entry.token) for entry in listed]
        if len(set(digests)) != len(digests):
            raise RegistryError("coordinator.enrollment_tokens lists the same token twice")
        table = enrollment_tokens
        with self.database.write() as connection:
            lock_name(connection, "listed enrollment tokens")
            stored = {
                row.token_sha256: row
                for row in connection.execute(
                    sa.select(table).where(table.c.token_sha256.in_(digests))
                )
            }
            for entry, digest in zip(listed, digests, strict=True):
                _store_listed(connection, entry, digest, stored.get(digest), now=now)
            connection.execute(
                sa.update(table)
                .where(
                    table.c.origin == TokenOrigin.CONFIG,
                    table.c.token_sha256.not_in(digests),
                    table.c.expires_at > now,
                )
                .values(expires_at=now)
            )
            rows = connection.execute(
                sa.select(table).where(table.c.token_sha256.in_(digests))
            ).all()
        by_digest = {row.token_sha256: _record(row) for row in rows}
        return [by_digest[digest] for digest in digests]

    def get(self, token_id: str) -> EnrollmentToken:
        """The token with public id ``token_id`` (:class:`NotFoundError` when none)."""
        with self.database.read() as connection:
            row = connection.execute(
                sa.select(enrollment_tokens).where(enrollment_tokens.c.token_id == token_id)
            ).first()
        if row is None:
            raise NotFoundError(f"no enrollment token {token_id!r}")
        return _record(row)

    def list(self) -> builtins.list[EnrollmentToken]:
        """Every token, spent and revoked ones included, oldest first."""
        query = sa.select(enrollment_tokens).order_by(
            enrollment_tokens.c.created_at, enrollment_tokens.c.token_id
        )
        with self.database.read() as connection:
            return [_record(row) for row in connection.execute(query)]

    def revoke(self, token_id: str, *, now: datetime | None = None) -> EnrollmentToken:
        """Make a token unusable from now on (revoking twice keeps the first time)."""
        revoked_at = require_aware(now or utc_now(), "now")
        table = enrollment_tokens
        with self.database.write() as connection:
            result = connection.execute(
                sa.update(table)
                .where(table.c.token_id == token_id)
                .values(
                    revoked_at=sa.func.coalesce(
                        table.c.revoked_at, sa.literal(revoked_at, UtcDateTime())
                    )
                )
                .returning(*table.c)
            ).first()
        if result is None:
            raise NotFoundError(f"no enrollment token {token_id!r}")
        return _record(result)


def _store_listed(
    connection: Connection,
    entry: ListedToken,
    digest: str,
    row: sa.Row[Any] | None,
    *,
    now: datetime,
) -> None:
    """Insert a newly listed token, or apply the config's limits to a stored one."""
    table = enrollment_tokens
    if row is None:
        connection.execute(
            table.insert().values(
                token_id=digest[:TOKEN_ID_DIGITS],
                token_sha256=digest,
                client_id=None,
                uses=entry.max_uses,
                uses_left=entry.max_uses,
                created_at=now,
                expires_at=entry.expiry(now),
                origin=TokenOrigin.CONFIG,
            )
        )
        return
    if row.origin is not TokenOrigin.CONFIG:
        raise RegistryError(
            f"coordinator.enrollment_tokens lists the secret of issued token {row.token_id}: "
            "list a secret of your own"
        )
    used = row.uses - row.uses_left  # taken uses stay taken
    connection.execute(
        sa.update(table)
        .where(table.c.token_sha256 == digest)
        .values(
            uses=entry.max_uses,
            uses_left=max(entry.max_uses - used, 0),
            expires_at=entry.expiry(row.created_at),
        )
    )


def _digest_of(token: str, *, client_id: str, now: datetime | None) -> tuple[str, datetime]:
    """The token's sha256 and the time of a redemption (refused at once for a token no stored
    one can be)."""
    _check_client_id(client_id)
    now = require_aware(now or utc_now(), "now")
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
        raise SecurityError("unknown enrollment token")
    return token_sha256(token), now


def _redeemable(digest: str, *, client_id: str, now: datetime) -> tuple[Any, ...]:
    """What a token must be for ``client_id`` to redeem one of its uses at ``now``."""
    table = enrollment_tokens
    return (
        table.c.token_sha256 == digest,
        table.c.revoked_at.is_(None),
        table.c.expires_at > now,
        table.c.uses_left > 0,
        sa.or_(table.c.client_id.is_(None), table.c.client_id == client_id),
    )


def _refusal(
    connection: Connection, digest: str, *, client_id: str, now: datetime
) -> SecurityError:
    """Why ``redeem`` consumed nothing (read in the same transaction)."""
    row = connection.execute(
        sa.select(enrollment_tokens).where(enrollment_tokens.c.token_sha256 == digest)
    ).first()
    if row is None:
        return SecurityError("unknown enrollment token")
    record = _record(row)
    name = f"enrollment token {record.token_id}"
    state = record.state(now)
    if state is TokenState.REVOKED:
        return SecurityError(f"{name} was revoked at {record.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    if state is TokenState.EXPIRED:
        return SecurityError(f"{name} expired at {record.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    if state is TokenState.USED_UP:
        return SecurityError(f"{name} is used up (all {record.uses} uses taken)")
    return SecurityError(f"{name} is bound to another client id, not {client_id!r}")
