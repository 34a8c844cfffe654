"""The differential-privacy budget ledger: each run's budget, accounted rounds, per-client spend.

The ledger lives in the registry database, so a coordinator that restarts
finds its run's budget, every accounted round (enough to rebuild the
accountant, see :meth:`PrivacyLedger.rounds`) and what each client has
spent, on SQLite or PostgreSQL alike.

- :meth:`PrivacyLedger.open_budget` fixes a run's (epsilon, delta) budget.
  Opening it again with the same values is a no-op; different values are
  refused unless the operator passes ``replace=True``.
- :meth:`PrivacyLedger.record_round` writes one accounted round in one
  transaction: the round's row and, for every participant, one more
  participation and ``client_epsilon`` more spent epsilon (one batched
  upsert, however many participants). ``epsilon`` is the run's cumulative
  epsilon after the round, so it never decreases. A round is recorded
  under its number and its ``attempt``: a run's first pass over its round
  numbers is attempt 0; when HEAD moved back past a released round (an
  operator's rollback, an unlearning) and the run plays those numbers
  again, the replays are new releases of new models, recorded (and their
  participants charged) under the next attempt, never folded into the
  rounds they replace. Attempts are recorded in order (the next one, or
  the current one) and, within an attempt, rounds in increasing order.
  Recording a round again is idempotent when it is the same round of the
  same attempt (same figures, same participants, compared by a digest of
  the sorted ids): a coordinator that cannot tell whether its commit
  landed simply retries. A different round under a recorded number and
  attempt is refused.
- A run locks (:meth:`PrivacyLedger.lock`, with when and why, kept for
  audit; the first lock stands) when the operator says so, or by itself in
  the transaction of the round that brings the spent epsilon to the budget:
  the round that exhausts the budget is recorded (its noise was already
  released), and every later round is refused.

>>> ledger = PrivacyLedger(database)  # doctest: +SKIP
>>> ledger.open_budget("run-7", epsilon=8.0, delta=1e-5)  # doctest: +SKIP
>>> ledger.record_round("run-7", round=1, epsilon=0.9, delta=1e-5, noise_multiplier=1.1,
...     sampling_rate=0.01, accountant="rdp/poisson/improved", participants=["c1", "c2"],
...     client_epsilon=0.9)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from shoal.core.errors import NotFoundError, RegistryError
from shoal.registry.audit import AuditEvent, append_entries
from shoal.registry.clients import require_aware, utc_now
from shoal.registry.database import Database, lock_name
from shoal.registry.schema import UtcDateTime, privacy_budgets, privacy_clients, privacy_rounds

MAX_ID_CHARS = 128
MAX_ACCOUNTANT_CHARS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyBudget:
    """A run's (epsilon, delta) budget, what its rounds have spent, and its lock."""

    run_id: str
    epsilon: float
    delta: float
    epsilon_spent: float  # the cumulative epsilon after the last recorded round (0 before any)
    last_round: int | None
    last_attempt: int | None  # the attempt of the last recorded round
    created_at: datetime
    locked_at: datetime | None
    lock_reason: str | None

    @property
    def locked(self) -> bool:
        """Whether further rounds are refused."""
        return self.locked_at is not None

    @property
    def exhausted(self) -> bool:
        """Whether the spent epsilon has reached the budget."""
        return self.epsilon_spent >= self.epsilon

    @property
    def remaining(self) -> float:
        """The epsilon left to spend (never negative)."""
        return max(0.0, self.epsilon - self.epsilon_spent)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyRound:
    """One accounted round: what an accountant needs to replay it, and who took part."""

    run_id: str
    round: int
    attempt: int  # 0 for the first release of the round number, one more per pass replaying it
    epsilon: float  # the run's cumulative epsilon after this round, at ``delta``
    delta: float
    noise_multiplier: float
    sampling_rate: float
    accountant: str  # how epsilon was computed, e.g. "rdp/poisson/improved"
    participants: int
    participants_sha256: str
    recorded_at: datetime


def participants_digest(participants: Sequence[str]) -> str:
    """The sha256 (hex) of the sorted participant ids, one per line."""
    return hashlib.sha256("\n".join(sorted(participants)).encode()).hexdigest()


class PrivacyLedger:
    """The privacy budgets, accounted rounds and per-client spend held in ``database``."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def open_budget(
        self,
        run_id: str,
        *,
        epsilon: float,
        delta: float,
        replace: bool = False,
        now: datetime | None = None,
    ) -> PrivacyBudget:
        """Open ``run_id``'s budget, or return it when it is already open with these values.

        Another budget for an open run is refused unless ``replace`` (an
        operator's decision); a replaced budget that the run has already
        spent locks the run. A lock is never lifted.
        """
        _require_id(run_id, "run_id")
        _require_positive(epsilon, "epsilon")
        _require_delta(delta, "delta")
        now = require_aware(now or utc_now(), "now")
        with self.database.write() as connection:
            lock_name(connection, _lock_key(run_id))
            existing = _find_budget(connection, run_id)
            if existing is None:
                connection.execute(
                    privacy_budgets.insert().values(
                        run_id=run_id, epsilon=epsilon, delta=delta, created_at=now
                    )
                )
                _audit_budget(connection, "budget_open", run_id, epsilon=epsilon, delta=delta)
                return _fetch_budget(connection, run_id)
            if (existing.epsilon, existing.delta) == (epsilon, delta):
                return existing
            if not replace:
                raise RegistryError(
                    f"run {run_id!r} already has a privacy budget of epsilon={existing.epsilon}, "
                    f"delta={existing.delta}: pass replace=True to change it to "
                    f"epsilon={epsilon}, delta={delta}"
                )
            connection.execute(_budget_by_id(run_id).values(epsilon=epsilon, delta=delta))
            _audit_budget(connection, "budget_replace", run_id, epsilon=epsilon, delta=delta)
            budget = _fetch_budget(connection, run_id)
            if budget.exhausted:
                reason = (
                    f"budget replaced by epsilon={epsilon}, already spent "
                    f"({budget.epsilon_spent:.6g} >= {epsilon:.6g})"
                )
                _lock(connection, run_id, reason=reason, now=now)
                budget = _fetch_budget(connection, run_id)
            return budget

    def budget(self, run_id: str) -> PrivacyBudget | None:
        """``run_id``'s budget and spend, or None when no budget was opened for it."""
        with self.database.read() as connection:
            return _find_budget(connection, run_id)

    def record_round(
        self,
        run_id: str,
        *,
        round: int,
        epsilon: float,
        delta: float,
        noise_multiplier: float,
        sampling_rate: float,
        accountant: str,
        participants: Sequence[str],
        client_epsilon: float,
        attempt: int = 0,
        now: datetime | None = None,
    ) -> PrivacyBudget:
        """Record an accounted round and charge its participants, in one transaction.

        ``epsilon`` is the run's cumulative epsilon after the round at
        ``delta`` (at most the budget's delta); ``client_epsilon`` is what
        the round adds to each participant's spent epsilon; ``attempt``
        says which pass over the run's round numbers released it (a round
        replayed after HEAD moved back is a new release: the next
        attempt). Returns the budget as it stands after the round: locked
        when this round exhausted it. A round of a locked run is refused;
        the same round recorded again changes nothing (see the module's
        notes).
        """
        _require_id(run_id, "run_id")
        _require_count(round, "round")
        _require_count(attempt, "attempt")
        _require_nonnegative(epsilon, "epsilon")
        _require_delta(delta, "delta")
        _require_positive(noise_multiplier, "noise_multiplier")
        if not (_is_finite(sampling_rate) and 0.0 < sampling_rate <= 1.0):
            raise RegistryError(f"sampling_rate must lie in (0, 1], got {sampling_rate!r}")
        _require_text(accountant, "accountant", limit=MAX_ACCOUNTANT_CHARS)
        _require_nonnegative(client_epsilon, "client_epsilon")
        client_ids = _participant_ids(participants)
        recorded_at = require_aware(now or utc_now(), "now")
        row: dict[str, Any] = {
            "run_id": run_id,
            "round": round,
            "attempt": attempt,
            "epsilon": epsilon,
            "delta": delta,
            "noise_multiplier": noise_multiplier,
            "sampling_rate": sampling_rate,
            "accountant": accountant,
            "participants": len(client_ids),
            "participants_sha256": participants_digest(client_ids),
            "recorded_at": recorded_at,
        }
        with self.database.write() as connection:
            lock_name(connection, _lock_key(run_id))
            budget = _fetch_budget(connection, run_id)
            if _already_recorded(connection, row):
                return budget
            _check_round(budget, row, latest=_latest_round(connection, run_id))
            connection.execute(privacy_rounds.insert().values(**row))
            _charge_clients(connection, run_id, client_ids, client_epsilon=client_epsilon)
            if epsilon >= budget.epsilon:
                reason = (
                    f"epsilon budget exhausted after round {round}{_of_attempt(attempt)}: "
                    f"{epsilon:.6g} >= {budget.epsilon:.6g} at delta={budget.delta:.3g}"
                )
                _lock(connection, run_id, reason=reason, now=recorded_at)
            return _fetch_budget(connection, run_id)

    def rounds(self, run_id: str) -> list[PrivacyRound]:
        """Every accounted round of ``run_id``, every attempt, in the order recorded (to
        rebuild its accountant: a replayed round was released again and counts again)."""
        query = (
            sa.select(privacy_rounds)
            .where(privacy_rounds.c.run_id == run_id)
            .order_by(privacy_rounds.c.attempt, privacy_rounds.c.round)
        )
        with self.database.read() as connection:
            _fetch_budget(connection, run_id)
            return [_round(row) for row in connection.execute(query)]

    def client_spent(self, run_id: str, client_id: str) -> float:
        """The epsilon ``client_id`` has spent in ``run_id`` (0.0 if it never took part)."""
        query = sa.select(privacy_clients.c.epsilon_spent).where(
            privacy_clients.c.run_id == run_id, privacy_clients.c.client_id == client_id
        )
        with self.database.read() as connection:
            _fetch_budget(connection, run_id)
            spent = connection.execute(query).scalar()
        return 0.0 if spent is None else float(spent)

    def clients_spent(self, run_id: str, client_ids: Sequence[str]) -> dict[str, float]:
        """The epsilon each of ``client_ids`` has spent in ``run_id`` (0.0 if none), one query."""
        wanted = sorted(set(client_ids))
        query = sa.select(privacy_clients.c.client_id, privacy_clients.c.epsilon_spent).where(
            privacy_clients.c.run_id == run_id, privacy_clients.c.client_id.in_(wanted)
        )
        with self.database.read() as connection:
            _fetch_budget(connection, run_id)
            spent = {row.client_id: float(row.epsilon_spent) for row in connection.execute(query)}
        return {client: spent.get(client, 0.0) for client in wanted}

    def clients_over_budget(self, run_id: str, *, limit: float) -> set[str]:
        """The clients of ``run_id`` that have spent at least ``limit``: never select them."""
        _require_nonnegative(limit, "limit")
        query = sa.select(privacy_clients.c.client_id).where(
            privacy_clients.c.run_id == run_id, privacy_clients.c.epsilon_spent >= limit
        )
        with self.database.read() as connection:
            _fetch_budget(connection, run_id)
            return set(connection.execute(query).scalars())

    def lock(self, run_id: str, *, reason: str, now: datetime | None = None) -> PrivacyBudget:
        """Lock ``run_id``: no further round is recorded. Locking again keeps the first lock."""
        _require_text(reason, "reason", limit=10_000)
        now = require_aware(now or utc_now(), "now")
        with self.database.write() as connection:
            lock_name(connection, _lock_key(run_id))
            _fetch_budget(connection, run_id)
            _lock(connection, run_id, reason=reason, now=now)
            return _fetch_budget(connection, run_id)

    def locked(self, run_id: str) -> str | None:
        """Why ``run_id`` is locked, or None while it is open."""
        with self.database.read() as connection:
            return _fetch_budget(connection, run_id).lock_reason


def _audit_budget(
    connection: Connection, kind: str, run_id: str, *, epsilon: float, delta: float
) -> None:
    event = AuditEvent(kind=kind, subject=run_id, details={"epsilon": epsilon, "delta": delta})
    append_entries(connection, [event])


def _lock_key(run_id: str) -> str:
    return f"privacy:{run_id}"


def _budget_by_id(run_id: str) -> sa.Update:
    return sa.update(privacy_budgets).where(privacy_budgets.c.run_id == run_id)


def _find_budget(connection: Connection, run_id: str) -> PrivacyBudget | None:
    row = connection.execute(
        sa.select(privacy_budgets).where(privacy_budgets.c.run_id == run_id)
    ).first()
    if row is None:
        return None
    latest = _latest_round(connection, run_id)
    return PrivacyBudget(
        run_id=row.run_id,
        epsilon=row.epsilon,
        delta=row.delta,
        epsilon_spent=0.0 if latest is None else latest.epsilon,
        last_round=None if latest is None else latest.round,
        last_attempt=None if latest is None else latest.attempt,
        created_at=row.created_at,
        locked_at=row.locked_at,
        lock_reason=row.lock_reason,
    )


def _fetch_budget(connection: Connection, run_id: str) -> PrivacyBudget:
    budget = _find_budget(connection, run_id)
    if budget is None:
        raise NotFoundError(f"no privacy budget is open for run {run_id!r}")
    return budget


def _latest_round(connection: Connection, run_id: str) -> PrivacyRound | None:
    row = connection.execute(
        sa.select(privacy_rounds)
        .where(privacy_rounds.c.run_id == run_id)
        .order_by(privacy_rounds.c.attempt.desc(), privacy_rounds.c.round.desc())
        .limit(1)
    ).first()
    return None if row is None else _round(row)


def _round(row: sa.Row[Any]) -> PrivacyRound:
    return PrivacyRound(
        run_id=row.run_id,
        round=row.round,
        attempt=row.attempt,
        epsilon=row.epsilon,
        delta=row.delta,
        noise_multiplier=row.noise_multiplier,
        sampling_rate=row.sampling_rate,
        accountant=row.accountant,
        participants=row.participants,
        participants_sha256=row.participants_sha256,
        recorded_at=row.recorded_at,
    )


def _already_recorded(connection: Connection, row: dict[str, Any]) -> bool:
    """True when this very round is recorded; a different round under its number (in its
    attempt) is refused."""
    stored = connection.execute(
        sa.select(privacy_rounds).where(
            privacy_rounds.c.run_id == row["run_id"],
            privacy_rounds.c.attempt == row["attempt"],
            privacy_rounds.c.round == row["round"],
        )
    ).first()
    if stored is None:
        return False
    compared = [key for key in row if key not in ("run_id", "round", "attempt", "recorded_at")]
    differing = [key for key in compared if getattr(stored, key) != row[key]]
    if differing:
        raise RegistryError(
            f"round {row['round']}{_of_attempt(row['attempt'])} of run {row['run_id']!r} is "
            f"already recorded with other {', '.join(differing)}: a recorded round cannot change"
        )
    return True


def _check_round(
    budget: PrivacyBudget, row: dict[str, Any], *, latest: PrivacyRound | None
) -> None:
    run_id, round = row["run_id"], row["round"]
    if budget.locked:
        raise RegistryError(
            f"run {run_id!r} is locked since {budget.locked_at:%Y-%m-%d %H:%M:%S} UTC "
            f"({budget.lock_reason}): round {round} is refused"
        )
    if row["delta"] > budget.delta:
        raise RegistryError(
            f"round {round} of run {run_id!r} reports delta={row['delta']}, above the budget's "
            f"delta={budget.delta}: compute epsilon at the budget's delta"
        )
    _check_order(row, latest=latest)
    if latest is not None and row["epsilon"] < latest.epsilon:
        raise RegistryError(
            f"round {round} of run {run_id!r} reports epsilon={row['epsilon']}, below the "
            f"{latest.epsilon} already spent: epsilon is the run's cumulative epsilon"
        )


def _check_order(row: dict[str, Any], *, latest: PrivacyRound | None) -> None:
    """Attempts in order, each one's rounds in increasing order (the first: from attempt 0)."""
    run_id, round, attempt = row["run_id"], row["round"], row["attempt"]
    allowed = (0,) if latest is None else (latest.attempt, latest.attempt + 1)
    if attempt not in allowed:
        raise RegistryError(
            f"round {round} of run {run_id!r} names attempt {attempt}, but the next round "
            f"belongs to attempt {' or '.join(map(str, allowed))}: attempts are recorded in order"
        )
    if latest is not None and attempt == latest.attempt and round <= latest.round:
        raise RegistryError(
            f"round {round}{_of_attempt(attempt)} of run {run_id!r} comes after round "
            f"{latest.round}: rounds are recorded in increasing order within an attempt"
        )


def _of_attempt(attempt: int) -> str:
    """How messages name a round's attempt (nothing for the first)."""
    return "" if attempt == 0 else f" (attempt {attempt})"


def _charge_clients(
    connection: Connection, run_id: str, client_ids: Sequence[str], *, client_epsilon: float
) -> None:
    """One more participation and ``client_epsilon`` more spent, per client: one batched upsert."""
    if not client_ids:
        return
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(privacy_clients)
    upsert = insert.on_conflict_do_update(
        index_elements=[privacy_clients.c.run_id, privacy_clients.c.client_id],
        set_={
            "participations": privacy_clients.c.participations + insert.excluded.participations,
            "epsilon_spent": privacy_clients.c.epsilon_spent + insert.excluded.epsilon_spent,
        },
    )
    connection.execute(
        upsert,
        [
            {
                "run_id": run_id,
                "client_id": client_id,
                "participations": 1,
                "epsilon_spent": client_epsilon,
            }
            for client_id in client_ids
        ],
    )


def _lock(connection: Connection, run_id: str, *, reason: str, now: datetime) -> None:
    """Lock the run unless it already is (the first lock and its reason stand); a new lock
    is an entry of the audit log."""
    locked = connection.execute(
        _budget_by_id(run_id)
        .where(privacy_budgets.c.locked_at.is_(None))
        .values(locked_at=sa.literal(now, UtcDateTime()), lock_reason=reason)
    )
    if locked.rowcount:
        budget = _fetch_budget(connection, run_id)
        details = {
            "reason": reason,
            "epsilon": budget.epsilon,
            "delta": budget.delta,
            "epsilon_spent": budget.epsilon_spent,
        }
        event = AuditEvent(kind="budget_lock", subject=run_id, details=details)
        append_entries(connection, [event], now=now)


def _participant_ids(participants: Sequence[str]) -> list[str]:
    if isinstance(participants, str):
        raise RegistryError("participants must be a sequence of client ids, not one string")
    client_ids = list(participants)
    for client_id in client_ids:
        _require_id(client_id, "a participant's client id")
    if len(set(client_ids)) != len(client_ids):
        repeated = sorted(c for c, count in Counter(client_ids).items() if count > 1)[:5]
        raise RegistryError(f"participants must be distinct; repeated: {repeated}")
    return client_ids


def _require_count(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RegistryError(f"{name} must be an integer >= 0, got {value!r}")


def _require_text(value: str, name: str, *, limit: int) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise RegistryError(f"{name} must have 1 to {limit} characters, got {value!r}")


def _require_id(value: str, name: str) -> None:
    _require_text(value, name, limit=MAX_ID_CHARS)


def _is_finite(value: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require_positive(value: float, name: str) -> None:
    if not (_is_finite(value) and value > 0):
        raise RegistryError(f"{name} must be a finite number > 0, got {value!r}")


def _require_nonnegative(value: float, name: str) -> None:
    if not (_is_finite(value) and value >= 0):
        raise RegistryError(f"{name} must be a finite number >= 0, got {value!r}")


def _require_delta(value: float, name: str) -> None:
    if not (_is_finite(value) and 0 < value < 1):
        raise RegistryError(f"{name} must lie strictly between 0 and 1, got {value!r}")
