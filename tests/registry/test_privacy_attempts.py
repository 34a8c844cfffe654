"""The privacy ledger's attempts on every backend: a round number released again is spent again."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from shoal.core import RegistryError
from shoal.registry import Database, PrivacyLedger, open_database
from shoal.registry.database import create_engine, resolve_database_url
from shoal.registry.migrations import MIGRATIONS, apply_migrations
from shoal.registry.privacy import participants_digest
from shoal.registry.schema import privacy_budgets

SCHEMA_14_ROUNDS = sa.table(  # the ledger's rounds as a Shoal without attempts wrote them
    "privacy_rounds",
    *(
        sa.column(name)
        for name in (
            "run_id", "round", "epsilon", "delta", "noise_multiplier", "sampling_rate",
            "accountant", "participants", "participants_sha256", "recorded_at",
        )
    ),
)  # fmt: skip
NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
RUN = "run-7"


@pytest.fixture
def ledger(database: Database) -> PrivacyLedger:
    ledger = PrivacyLedger(database)
    ledger.open_budget(RUN, epsilon=8.0, delta=1e-5, now=NOW)
    return ledger


def record(
    ledger: PrivacyLedger,
    round: int,
    epsilon: float,
    participants: Sequence[str],
    *,
    attempt: int = 0,
    **overrides: Any,
) -> Any:
    arguments: dict[str, Any] = {
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "sampling_rate": 0.01,
        "accountant": "rdp/poisson/improved",
        "client_epsilon": 0.5,
        "now": NOW + timedelta(minutes=10 * attempt + round),
    } | overrides
    return ledger.record_round(
        RUN, round=round, epsilon=epsilon, participants=participants, attempt=attempt, **arguments
    )


def test_a_replayed_round_is_a_new_release_spent_and_charged_again(ledger: PrivacyLedger) -> None:
    for round_number, epsilon in ((1, 1.0), (2, 1.5), (3, 2.0)):
        record(ledger, round_number, epsilon, ["a", "b"])
    # HEAD moved back to round 1: rounds 2 and 3 are played again, without b
    record(ledger, 2, 2.4, ["a", "c"], attempt=1)
    budget = record(ledger, 3, 2.8, ["a", "c"], attempt=1)
    assert (budget.last_attempt, budget.last_round, budget.epsilon_spent) == (1, 3, 2.8)
    keys = [(entry.attempt, entry.round) for entry in ledger.rounds(RUN)]
    assert keys == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # every release, in order
    spent = ledger.clients_spent(RUN, ["a", "b", "c"])
    assert spent == {"a": 2.5, "b": 1.5, "c": 1.0}  # a took part in five releases


def test_a_retry_within_an_attempt_is_idempotent(ledger: PrivacyLedger) -> None:
    record(ledger, 1, 1.0, ["a"])
    record(ledger, 1, 1.5, ["a"], attempt=1)
    again = record(ledger, 1, 1.5, ["a"], attempt=1, now=NOW + timedelta(days=1))
    assert again.epsilon_spent == 1.5 and len(ledger.rounds(RUN)) == 2
    assert record(ledger, 1, 1.0, ["a"]) == again  # the first attempt's record still answers
    assert ledger.client_spent(RUN, "a") == 1.0
    with pytest.raises(RegistryError, match=r"round 1 \(attempt 1\) of run 'run-7' is already"):
        record(ledger, 1, 1.5, ["a", "b"], attempt=1)


@pytest.mark.parametrize(
    ("round", "epsilon", "attempt", "message"),
    [
        (4, 3.0, 3, r"names attempt 3, but the next round belongs to attempt 1 or 2: attempts"),
        (4, 3.0, 0, r"names attempt 0, but the next round belongs to attempt 1 or 2"),
        (3, 3.5, 1, r"round 3 \(attempt 1\) .* already recorded with other epsilon"),
        (2, 3.0, 1, r"comes after round 3: rounds are recorded in increasing order within"),
        (1, 2.9, 2, r"epsilon=2\.9, below the 3\.0 already spent"),
        (-1, 3.5, 2, r"round must be an integer >= 0"),
        (1, 3.5, -1, r"attempt must be an integer >= 0"),
    ],
)
def test_attempts_come_in_order_and_epsilon_never_shrinks(
    ledger: PrivacyLedger, round: int, epsilon: float, attempt: int, message: str
) -> None:
    record(ledger, 5, 2.0, ["a"])
    record(ledger, 3, 3.0, ["a"], attempt=1)
    with pytest.raises(RegistryError, match=message):
        record(ledger, round, epsilon, ["a"], attempt=attempt)
    assert len(ledger.rounds(RUN)) == 2 and ledger.client_spent(RUN, "a") == 1.0


def test_the_first_round_of_a_run_belongs_to_attempt_zero(ledger: PrivacyLedger) -> None:
    with pytest.raises(RegistryError, match="names attempt 1, but the next round belongs to "):
        record(ledger, 1, 1.0, ["a"], attempt=1)
    assert ledger.rounds(RUN) == []


def test_a_replay_that_exhausts_the_budget_locks_the_run(ledger: PrivacyLedger) -> None:
    record(ledger, 1, 5.0, ["a"])
    record(ledger, 2, 7.0, ["a"])
    budget = record(ledger, 2, 8.5, ["a"], attempt=1)
    assert budget.locked
    assert budget.lock_reason == (
        "epsilon budget exhausted after round 2 (attempt 1): 8.5 >= 8 at delta=1e-05"
    )
    with pytest.raises(RegistryError, match="is locked"):
        record(ledger, 1, 9.0, ["a"], attempt=2)


def test_rounds_recorded_before_attempts_existed_become_attempt_zero(database_url: str) -> None:
    """A ledger written by a Shoal without attempts (schema 14) keeps its rounds as the first
    attempt, and its key becomes (run, attempt, round) on every backend."""
    database = Database(create_engine(resolve_database_url(database_url)))
    try:
        apply_migrations(database, migrations=MIGRATIONS[:14])
        with database.write() as connection:
            connection.execute(
                privacy_budgets.insert().values(run_id=RUN, epsilon=8.0, delta=1e-5, created_at=NOW)
            )
            connection.execute(
                SCHEMA_14_ROUNDS.insert().values(
                    run_id=RUN, round=1, epsilon=1.0, delta=1e-5, noise_multiplier=1.1,
                    sampling_rate=0.01, accountant="rdp/poisson/improved", participants=1,
                    participants_sha256=participants_digest(["a"]), recorded_at=NOW,
                )
            )  # fmt: skip
        apply_migrations(database)
        with database.read() as connection:
            key = sa.inspect(connection).get_pk_constraint("privacy_rounds")
        assert key["constrained_columns"] == ["run_id", "attempt", "round"]
    finally:
        database.close()
    with open_database(database_url) as database:
        ledger = PrivacyLedger(database)
        (entry,) = ledger.rounds(RUN)
        assert (entry.attempt, entry.round, entry.epsilon) == (0, 1, 1.0)
        assert record(ledger, 1, 1.5, ["a"], attempt=1).last_attempt == 1
