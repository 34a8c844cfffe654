"""The budget as a resource: the plan calibrates, the keeper stops before overspending, restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.config import parse_config
from shoal.core import ConfigError, RunError
from shoal.privacy.accounting import PrivacyAccountant
from shoal.privacy.budget import PrivacyBudgetKeeper, plan_privacy
from shoal.registry import registry_location
from shoal.registry.privacy import PrivacyLedger


def _plan(**privacy: object):  # type: ignore[no-untyped-def]
    config = parse_config({"privacy": {"placement": "central", **privacy}})
    return plan_privacy(config.privacy, population=1000, cohort=50, rounds=40)


def test_the_plan_calibrates_the_noise_to_spend_the_budget_in_the_planned_rounds() -> None:
    plan = _plan(epsilon=3.0)
    assert plan.delta == pytest.approx(1e-3)  # 1 / population
    assert plan.sampling_rate == pytest.approx(0.05)
    accountant = plan.accountant()
    accountant.compose(
        noise_multiplier=plan.noise_multiplier, sample_size=50, population=1000, steps=40
    )
    assert accountant.epsilon(delta=plan.delta) <= 3.0
    assert plan.label == "rdp/fixed/improved"
    assert _plan(noise_multiplier=1.3, epsilon=3.0).noise_multiplier == 1.3


def test_the_keeper_stops_at_the_right_round_and_the_ledger_survives_a_restart(
    tmp_path: Path,
) -> None:
    plan = _plan(noise_multiplier=1.0, epsilon=2.0)
    expected = PrivacyAccountant(method="rdp", sampling="fixed", conversion="improved")
    stop = 0
    for round_number in range(1, 1000):
        expected.compose(noise_multiplier=1.0, sample_size=50, population=1000)
        if expected.epsilon(delta=plan.delta) > 2.0:
            stop = round_number
            break
    database = registry_location(tmp_path, None).open()
    keeper = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    fired: list[tuple[int, str]] = []
    for round_number in range(1, stop):
        assert keeper.before_round(round_number) is None
        keeper.after_round(round_number, [f"c{round_number}", "shared"])
        if round_number == stop // 2:  # the coordinator restarts half way
            database.close()
            database = registry_location(tmp_path, None).open()
            spent = keeper.epsilon
            keeper = PrivacyBudgetKeeper(
                plan,
                PrivacyLedger(database),
                "run",
                on_exhausted=lambda r, e, why: fired.append((r, why)),
            )
            assert keeper.epsilon == pytest.approx(spent)
    reason = keeper.before_round(stop)
    assert reason is not None and f"round {stop} would spend" in reason
    assert fired and fired[0][0] == stop
    assert keeper.locked() == reason  # the data locks, with the reason
    assert keeper.before_round(stop + 1) == reason
    ledger = PrivacyLedger(database)
    assert len(ledger.rounds("run")) == stop - 1
    assert ledger.client_spent("run", "shared") > ledger.client_spent("run", "c1") > 0
    database.close()


def test_clients_past_their_own_budget_are_barred(tmp_path: Path) -> None:
    plan = _plan(noise_multiplier=2.0, epsilon=50.0, client_epsilon=5.0)
    database = registry_location(tmp_path, None).open()
    keeper = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    for round_number in range(1, 20):
        keeper.after_round(round_number, ["busy"] if round_number > 1 else ["busy", "idle"])
    assert "busy" in keeper.barred()
    assert "idle" not in keeper.barred()
    database.close()


def test_without_noise_there_is_no_dp(tmp_path: Path) -> None:
    plan = _plan(noise_multiplier=0.0, epsilon=1.0)
    database = registry_location(tmp_path, None).open()
    with pytest.raises(ConfigError, match="without noise"):
        PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    database.close()


def test_a_round_replayed_after_a_crash_is_not_spent_twice(tmp_path: Path) -> None:
    plan = _plan(noise_multiplier=1.0, epsilon=20.0)
    database = registry_location(tmp_path, None).open()
    keeper = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    first = keeper.after_round(1, ["a", "b"])
    restarted = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    assert restarted.after_round(1, ["a", "b"]) == first  # the resumed run replays round 1
    assert restarted.epsilon == pytest.approx(first.epsilon)
    assert len(PrivacyLedger(database).rounds("run")) == 1
    database.close()


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_each_round_is_accounted_at_its_own_population_and_replayed_so(
    tmp_path: Path, sampling: str
) -> None:
    plan = _plan(noise_multiplier=1.0, delta=1e-5, sampling=sampling)  # cohort 50
    populations = [1000, 400, 30, 2500]  # the eligible population changes from round to round
    expected = PrivacyAccountant(method="rdp", sampling=sampling, conversion="improved")  # type: ignore[arg-type]
    database = registry_location(tmp_path, None).open()
    keeper = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    for round_number, population in enumerate(populations, start=1):
        assert keeper.before_round(round_number, population=population) is None
        keeper.after_round(round_number, [f"c{round_number}"])
        if sampling == "poisson":
            expected.compose(noise_multiplier=1.0, sampling_rate=min(1.0, 50 / population))
        else:
            size = min(50, population)
            expected.compose(noise_multiplier=1.0, sample_size=size, population=population)
        assert keeper.epsilon == pytest.approx(expected.epsilon(delta=1e-5), rel=1e-9)
    rates = [entry.sampling_rate for entry in PrivacyLedger(database).rounds("run")]
    assert rates == [0.05, 0.125, 1.0, 0.02]
    restarted = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    assert restarted.epsilon == pytest.approx(keeper.epsilon, rel=1e-9)  # replayed, not re-planned
    database.close()


def test_a_population_that_cannot_be_established_is_refused() -> None:
    plan = _plan(noise_multiplier=1.0)
    with pytest.raises(RunError, match="at least one eligible client"):
        plan.step(0)


def _accounted(steps: int) -> float:
    """The epsilon of ``steps`` rounds of the plan below, composed independently."""
    accountant = PrivacyAccountant(method="rdp", sampling="fixed", conversion="improved")
    accountant.compose(noise_multiplier=1.0, sample_size=50, population=1000, steps=steps)
    return accountant.epsilon(delta=1e-3)


def test_rounds_replayed_after_head_moved_back_are_spent_and_charged_again(
    tmp_path: Path,
) -> None:
    plan = _plan(noise_multiplier=1.0, epsilon=50.0)
    database = registry_location(tmp_path, None).open()
    keeper = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    for round_number in range(1, 5):
        keeper.after_round(round_number, ["shared", f"c{round_number}"])
    four = keeper.epsilon
    released = {(0, round_number) for round_number in range(5)}  # versions 0 to 4, committed
    restarted = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    restarted.resume_at(1, released=released)  # HEAD rolled back to round 1's version
    assert restarted.attempt == 1
    for round_number in range(2, 5):  # rounds 2 to 4 are played again: new releases
        spent = restarted.after_round(round_number, ["shared", f"d{round_number}"])
    assert spent.epsilon == pytest.approx(_accounted(7), rel=1e-9) and spent.epsilon > four
    ledger = PrivacyLedger(database)
    assert [(entry.attempt, entry.round) for entry in ledger.rounds("run")] == [
        (0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4),
    ]  # fmt: skip
    one = ledger.client_spent("run", "c1")
    assert ledger.client_spent("run", "shared") == pytest.approx(7 * one)  # charged again
    again = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")  # a later restart
    assert again.epsilon == pytest.approx(spent.epsilon, rel=1e-9)  # composes every release
    database.close()


def test_a_crash_before_a_replayed_rounds_commit_is_retried_not_spent_again(
    tmp_path: Path,
) -> None:
    plan = _plan(noise_multiplier=1.0, epsilon=50.0)
    database = registry_location(tmp_path, None).open()
    keeper = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    for round_number in range(1, 4):
        keeper.after_round(round_number, ["a"])
    released = {(0, round_number) for round_number in range(4)}
    replaying = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    replaying.resume_at(1, released=released)
    recorded = replaying.after_round(2, ["b"])  # recorded; the crash comes before the commit
    for _restart in range(2):  # each restart finds round 2 of attempt 1 recorded, unreleased
        retrying = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
        retrying.resume_at(1, released=released)
        assert retrying.attempt == 1
        assert retrying.after_round(2, ["b"]) == recorded
        assert retrying.epsilon == pytest.approx(_accounted(4), rel=1e-9)
    assert len(PrivacyLedger(database).rounds("run")) == 4
    assert PrivacyLedger(database).client_spent("run", "b") == pytest.approx(
        PrivacyLedger(database).client_spent("run", "a") / 3
    )
    # once round 2 of attempt 1 was committed, moving HEAD back past it opens attempt 2
    moved_back = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    moved_back.resume_at(1, released=released | {(1, 2)})
    assert moved_back.attempt == 2
    database.close()


def test_a_resume_at_head_or_after_a_crash_keeps_the_attempt(tmp_path: Path) -> None:
    plan = _plan(noise_multiplier=1.0, epsilon=50.0)
    database = registry_location(tmp_path, None).open()
    keeper = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
    for round_number in range(1, 4):
        keeper.after_round(round_number, ["a"])
    committed = {(0, round_number) for round_number in range(3)}  # round 3 never committed
    for head_round in (2, 3, 7):  # a crash before round 3's commit; a plain resume; ahead
        restarted = PrivacyBudgetKeeper(plan, PrivacyLedger(database), "run")
        restarted.resume_at(head_round, released=committed)
        assert restarted.attempt == 0
    database.close()
