"""The privacy budget ledger on every backend: budgets, rounds, client spend, locks, restarts."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core import NotFoundError, RegistryError
from shoal.registry import Database, PrivacyLedger, open_database
from shoal.registry.privacy import participants_digest
from shoal.registry.schema import privacy_clients, privacy_rounds

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
RUN = "run-7"
ACCOUNTANT = "rdp/poisson/improved"


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
    client_epsilon: float = 0.5,
    run_id: str = RUN,
    **overrides: Any,
) -> Any:
    arguments: dict[str, Any] = {
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "sampling_rate": 0.01,
        "accountant": ACCOUNTANT,
        "now": NOW + timedelta(minutes=round),
    } | overrides
    return ledger.record_round(
        run_id,
        round=round,
        epsilon=epsilon,
        participants=participants,
        client_epsilon=client_epsilon,
        **arguments,
    )


def participations(database: Database, client_id: str) -> int | None:
    with database.read() as connection:
        value = connection.execute(
            sa.select(privacy_clients.c.participations).where(
                privacy_clients.c.run_id == RUN, privacy_clients.c.client_id == client_id
            )
        ).scalar()
    return None if value is None else int(value)


def test_an_unknown_run_has_no_budget_and_clear_errors(database: Database) -> None:
    ledger = PrivacyLedger(database)
    assert ledger.budget("nothing") is None
    message = "no privacy budget is open for run 'nothing'"
    with pytest.raises(NotFoundError, match=message):
        ledger.rounds("nothing")
    with pytest.raises(NotFoundError, match=message):
        ledger.client_spent("nothing", "c1")
    with pytest.raises(NotFoundError, match=message):
        ledger.clients_over_budget("nothing", limit=1.0)
    with pytest.raises(NotFoundError, match=message):
        ledger.lock("nothing", reason="audit")
    with pytest.raises(NotFoundError, match=message):
        ledger.locked("nothing")
    with pytest.raises(NotFoundError, match=message):
        record(ledger, 1, 0.5, ["c1"], run_id="nothing")


def test_a_fresh_budget_has_spent_nothing(ledger: PrivacyLedger) -> None:
    budget = ledger.budget(RUN)
    assert budget is not None
    assert (budget.epsilon, budget.delta, budget.epsilon_spent) == (8.0, 1e-5, 0.0)
    assert (budget.last_round, budget.created_at) == (None, NOW)
    assert (budget.locked, budget.locked_at, budget.lock_reason) == (False, None, None)
    assert (budget.exhausted, budget.remaining) == (False, 8.0)
    assert ledger.rounds(RUN) == []
    assert ledger.client_spent(RUN, "c1") == 0.0
    assert ledger.clients_over_budget(RUN, limit=0.0) == set()
    assert ledger.locked(RUN) is None


def test_opening_a_budget_again_is_idempotent_and_changing_it_needs_replace(
    ledger: PrivacyLedger,
) -> None:
    again = ledger.open_budget(RUN, epsilon=8.0, delta=1e-5, now=NOW + timedelta(days=1))
    assert again == ledger.budget(RUN)
    assert again.created_at == NOW  # the first opening stands
    with pytest.raises(RegistryError, match=r"epsilon=8.0, delta=1e-05: pass replace=True"):
        ledger.open_budget(RUN, epsilon=10.0, delta=1e-5)
    with pytest.raises(RegistryError, match="replace=True"):
        ledger.open_budget(RUN, epsilon=8.0, delta=1e-6)
    assert ledger.budget(RUN) == again  # the refusal changed nothing
    replaced = ledger.open_budget(RUN, epsilon=10.0, delta=1e-6, replace=True)
    assert (replaced.epsilon, replaced.delta, replaced.locked) == (10.0, 1e-6, False)
    assert ledger.open_budget("run-8", epsilon=1.0, delta=0.5).epsilon == 1.0  # runs are apart


def test_replacing_a_budget_below_what_was_spent_locks_the_run(ledger: PrivacyLedger) -> None:
    record(ledger, 1, 3.0, ["c1"])
    replaced = ledger.open_budget(RUN, epsilon=2.0, delta=1e-5, replace=True, now=NOW)
    assert replaced.locked and replaced.exhausted and replaced.remaining == 0.0
    assert ledger.locked(RUN) == "budget replaced by epsilon=2.0, already spent (3 >= 2)"


def test_per_client_spend_adds_up_over_rounds(ledger: PrivacyLedger, database: Database) -> None:
    record(ledger, 1, 1.0, ["a", "b"], client_epsilon=0.5)
    record(ledger, 2, 1.5, ["b", "c"], client_epsilon=0.25)
    budget = record(ledger, 4, 2.25, ["a", "b", "c"], client_epsilon=1.0)  # round 3 was lost
    assert (budget.epsilon_spent, budget.last_round, budget.remaining) == (2.25, 4, 5.75)
    assert {c: ledger.client_spent(RUN, c) for c in "abcd"} == {
        "a": 1.5,
        "b": 1.75,
        "c": 1.25,
        "d": 0.0,
    }
    assert [participations(database, c) for c in "abcd"] == [2, 3, 2, None]
    rounds = ledger.rounds(RUN)
    assert [(r.round, r.epsilon, r.participants) for r in rounds] == [
        (1, 1.0, 2),
        (2, 1.5, 2),
        (4, 2.25, 3),
    ]
    first = rounds[0]
    assert (first.delta, first.noise_multiplier, first.sampling_rate) == (1e-5, 1.1, 0.01)
    assert (first.accountant, first.recorded_at) == (ACCOUNTANT, NOW + timedelta(minutes=1))
    assert first.participants_sha256 == participants_digest(["b", "a"])


def test_a_round_without_participants_is_recorded(ledger: PrivacyLedger) -> None:
    budget = record(ledger, 0, 0.0, [])
    assert (budget.last_round, budget.epsilon_spent) == (0, 0.0)
    assert ledger.rounds(RUN)[0].participants == 0


def test_clients_over_budget_includes_the_limit(ledger: PrivacyLedger) -> None:
    record(ledger, 1, 1.0, ["a", "b", "c"], client_epsilon=1.0)
    record(ledger, 2, 2.0, ["a", "b"], client_epsilon=1.0)
    record(ledger, 3, 3.0, ["a"], client_epsilon=1.0)
    assert ledger.clients_over_budget(RUN, limit=3.0) == {"a"}
    assert ledger.clients_over_budget(RUN, limit=2.0) == {"a", "b"}
    assert ledger.clients_over_budget(RUN, limit=1.5) == {"a", "b"}
    assert ledger.clients_over_budget(RUN, limit=0.0) == {"a", "b", "c"}
    assert ledger.clients_over_budget(RUN, limit=3.5) == set()


def test_recording_the_same_round_again_changes_nothing(
    ledger: PrivacyLedger, database: Database
) -> None:
    first = record(ledger, 1, 1.0, ["a", "b"])
    again = record(ledger, 1, 1.0, ["b", "a"], now=NOW + timedelta(hours=1))  # a retry
    assert again == first
    assert ledger.client_spent(RUN, "a") == 0.5
    assert participations(database, "a") == 1
    assert ledger.rounds(RUN)[0].recorded_at == NOW + timedelta(minutes=1)


@pytest.mark.parametrize(
    ("change", "differing"),
    [
        ({"participants": ["a", "c"]}, "participants_sha256"),
        ({"participants": ["a"]}, "participants, participants_sha256"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"noise_multiplier": 1.2, "accountant": "pld"}, "noise_multiplier, accountant"),
    ],
)
def test_a_different_round_under_a_recorded_number_is_refused(
    ledger: PrivacyLedger, change: dict[str, Any], differing: str
) -> None:
    record(ledger, 1, 1.0, ["a", "b"])
    arguments: dict[str, Any] = {"epsilon": 1.0, "participants": ["a", "b"]} | change
    with pytest.raises(RegistryError, match=f"already recorded with other {differing}: "):
        record(ledger, 1, **arguments)
    assert ledger.client_spent(RUN, "a") == 0.5


def test_rounds_go_forward_and_epsilon_never_shrinks(ledger: PrivacyLedger) -> None:
    record(ledger, 5, 2.0, ["a"])
    with pytest.raises(RegistryError, match="comes after round 5: rounds are recorded in"):
        record(ledger, 4, 2.5, ["a"])
    with pytest.raises(RegistryError, match=r"epsilon=1\.5, below the 2\.0 already spent"):
        record(ledger, 6, 1.5, ["a"])
    with pytest.raises(RegistryError, match=r"delta=0\.001, above the budget's delta=1e-05"):
        record(ledger, 6, 2.5, ["a"], delta=1e-3)
    assert [r.round for r in ledger.rounds(RUN)] == [5]
    assert ledger.client_spent(RUN, "a") == 0.5


def test_a_locked_run_refuses_further_rounds(ledger: PrivacyLedger) -> None:
    record(ledger, 1, 1.0, ["a"])
    locked = ledger.lock(RUN, reason="consent withdrawn by the data owner", now=NOW)
    assert (locked.locked, locked.locked_at) == (True, NOW)
    assert ledger.locked(RUN) == "consent withdrawn by the data owner"
    with pytest.raises(RegistryError, match=r"locked since 2026-03-20 10:00:00 UTC \(consent"):
        record(ledger, 2, 2.0, ["a"])
    assert record(ledger, 1, 1.0, ["a"]) == locked  # a retry of a recorded round still answers
    relocked = ledger.lock(RUN, reason="another reason", now=NOW + timedelta(days=1))
    assert (relocked.locked_at, relocked.lock_reason) == (NOW, locked.lock_reason)
    assert ledger.client_spent(RUN, "a") == 0.5


def test_the_round_that_exhausts_the_budget_is_recorded_and_locks_the_run(
    ledger: PrivacyLedger,
) -> None:
    assert not record(ledger, 1, 7.5, ["a"]).locked
    budget = record(ledger, 2, 8.0, ["a", "b"])
    assert budget.locked and budget.exhausted and budget.remaining == 0.0
    assert budget.locked_at == NOW + timedelta(minutes=2)
    assert budget.lock_reason == "epsilon budget exhausted after round 2: 8 >= 8 at delta=1e-05"
    assert [r.round for r in ledger.rounds(RUN)] == [1, 2]
    assert ledger.client_spent(RUN, "b") == 0.5
    with pytest.raises(RegistryError, match="epsilon budget exhausted"):
        record(ledger, 3, 8.5, ["c"])


def test_everything_survives_a_restart(database_url: str) -> None:
    with open_database(database_url) as database:
        ledger = PrivacyLedger(database)
        ledger.open_budget(RUN, epsilon=2.0, delta=1e-6, now=NOW)
        record(ledger, 1, 1.0, ["a", "b"], delta=1e-6)
        record(ledger, 2, 2.5, ["b"], delta=1e-6)  # exhausts and locks
        before = (ledger.budget(RUN), ledger.rounds(RUN))
    with open_database(database_url) as database:
        ledger = PrivacyLedger(database)
        assert (ledger.budget(RUN), ledger.rounds(RUN)) == before
        assert ledger.client_spent(RUN, "b") == 1.0
        assert ledger.clients_over_budget(RUN, limit=1.0) == {"b"}
        assert ledger.locked(RUN) == (
            "epsilon budget exhausted after round 2: 2.5 >= 2 at delta=1e-06"
        )
        with pytest.raises(RegistryError, match="is locked"):
            record(ledger, 3, 3.0, ["a"], delta=1e-6)


@contextmanager
def transactions_counted(database: Database) -> Iterator[dict[str, int]]:
    counts = {"begin": 0, "commit": 0, "rollback": 0}

    def counter(name: str) -> Any:
        def count(*_arguments: object) -> None:
            counts[name] += 1

        return count

    listeners = [(name, counter(name)) for name in counts]
    for name, listener in listeners:
        sa.event.listen(database.engine, name, listener)
    try:
        yield counts
    finally:
        for name, listener in listeners:
            sa.event.remove(database.engine, name, listener)


def test_ten_thousand_participants_are_one_transaction(
    ledger: PrivacyLedger, database: Database
) -> None:
    participants = [f"client-{i:05d}" for i in range(10_000)]
    with transactions_counted(database) as counts:
        budget = record(ledger, 1, 1.0, participants, client_epsilon=0.75)
    assert counts == {"begin": 1, "commit": 1, "rollback": 0}
    assert budget.last_round == 1
    assert ledger.clients_over_budget(RUN, limit=0.75) == set(participants)
    with transactions_counted(database) as counts:
        record(ledger, 2, 1.5, participants[::2], client_epsilon=0.75)
    assert counts == {"begin": 1, "commit": 1, "rollback": 0}
    assert len(ledger.clients_over_budget(RUN, limit=1.5)) == 5_000
    assert participations(database, "client-09998") == 2
    assert participations(database, "client-09999") == 1


class Injected(Exception):
    """A failure injected into the middle of a write."""


def test_a_failure_while_charging_clients_records_nothing(
    ledger: PrivacyLedger, database: Database
) -> None:
    def fail_on_client_upsert(
        _connection: object, _cursor: object, statement: str, *_: object
    ) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO PRIVACY_CLIENTS"):
            raise Injected

    sa.event.listen(database.engine, "before_cursor_execute", fail_on_client_upsert)
    try:
        with pytest.raises(Injected):
            record(ledger, 1, 1.0, [f"c{i}" for i in range(100)])
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", fail_on_client_upsert)
    with database.read() as connection:
        stored = connection.execute(sa.select(sa.func.count()).select_from(privacy_rounds))
        assert stored.scalar() == 0
    assert ledger.rounds(RUN) == []
    assert ledger.clients_over_budget(RUN, limit=0.0) == set()
    assert record(ledger, 1, 1.0, ["c0"]).last_round == 1  # and the run carries on


def test_concurrent_retries_of_one_round_charge_once(
    ledger: PrivacyLedger, database: Database
) -> None:
    errors: list[BaseException] = []

    def retry() -> None:
        try:
            record(ledger, 1, 1.0, ["a", "b", "c"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=retry) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [participations(database, c) for c in "abc"] == [1, 1, 1]


def test_the_spend_index_exists(database: Database) -> None:
    with database.read() as connection:
        indexes = sa.inspect(connection).get_indexes("privacy_clients")
    assert {"name": "ix_privacy_clients_spent", "columns": ["run_id", "epsilon_spent"]} in [
        {"name": index["name"], "columns": index["column_names"]} for index in indexes
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"epsilon": -1.0}, "epsilon must be a finite number > 0, got -1.0"),
        ({"epsilon": 0.0}, "epsilon must be a finite number > 0"),
        ({"epsilon": float("nan")}, "epsilon must be a finite number > 0"),
        ({"epsilon": float("inf")}, "epsilon must be a finite number > 0"),
        ({"delta": 0.0}, r"delta must lie strictly between 0 and 1, got 0.0"),
        ({"delta": 1.0}, "delta must lie strictly between 0 and 1"),
        ({"delta": -1e-5}, "delta must lie strictly between 0 and 1"),
        ({"run_id": ""}, "run_id must have 1 to 128 characters"),
        ({"run_id": "r" * 129}, "run_id must have 1 to 128 characters"),
    ],
)
def test_bad_budgets_are_refused(
    database: Database, arguments: dict[str, Any], message: str
) -> None:
    ledger = PrivacyLedger(database)
    values: dict[str, Any] = {"run_id": RUN, "epsilon": 1.0, "delta": 1e-5} | arguments
    run_id = values.pop("run_id")
    with pytest.raises(RegistryError, match=message):
        ledger.open_budget(run_id, **values)
    assert ledger.budget(run_id) is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"epsilon": -0.5}, "epsilon must be a finite number >= 0, got -0.5"),
        ({"epsilon": float("inf")}, "epsilon must be a finite number >= 0"),
        ({"delta": 0.0}, "delta must lie strictly between 0 and 1"),
        ({"delta": 1.5}, "delta must lie strictly between 0 and 1"),
        ({"round": -1}, "round must be an integer >= 0, got -1"),
        ({"round": 1.0}, "round must be an integer >= 0"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0"),
        ({"sampling_rate": 0.0}, r"sampling_rate must lie in \(0, 1\]"),
        ({"sampling_rate": 1.5}, r"sampling_rate must lie in \(0, 1\]"),
        ({"sampling_rate": "0.1"}, r"sampling_rate must lie in \(0, 1\]"),
        ({"accountant": ""}, "accountant must have 1 to 64 characters"),
        ({"client_epsilon": -0.1}, "client_epsilon must be a finite number >= 0"),
        ({"participants": ["a", "b", "a"]}, r"participants must be distinct; repeated: \['a'\]"),
        ({"participants": ["a", ""]}, "a participant's client id must have 1 to 128"),
        ({"participants": "abc"}, "a sequence of client ids, not one string"),
    ],
)
def test_bad_rounds_are_refused_and_record_nothing(
    ledger: PrivacyLedger, arguments: dict[str, Any], message: str
) -> None:
    defaults: dict[str, Any] = {"round": 1, "epsilon": 1.0, "participants": ["a", "b"]}
    with pytest.raises(RegistryError, match=message):
        record(ledger, **(defaults | arguments))
    assert ledger.rounds(RUN) == []
    assert ledger.client_spent(RUN, "a") == 0.0


def test_a_lock_needs_a_reason(ledger: PrivacyLedger) -> None:
    with pytest.raises(RegistryError, match="reason must have 1 to"):
        ledger.lock(RUN, reason="")
    assert ledger.locked(RUN) is None


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sets(st.sampled_from("abcdefgh"), max_size=8),
            st.integers(min_value=0, max_value=4).map(lambda quarter: quarter / 4),
        ),
        max_size=6,
    )
)
def test_each_clients_spend_is_the_sum_of_its_rounds(
    rounds: list[tuple[set[str], float]],
) -> None:
    with open_database("sqlite:///:memory:") as database:
        ledger = PrivacyLedger(database)
        ledger.open_budget(RUN, epsilon=1_000.0, delta=1e-5)
        for number, (participants, client_epsilon) in enumerate(rounds):
            record(
                ledger, number, float(number), sorted(participants), client_epsilon=client_epsilon
            )
        for client_id in "abcdefgh":
            expected = sum(spent for members, spent in rounds if client_id in members)
            assert ledger.client_spent(RUN, client_id) == expected
