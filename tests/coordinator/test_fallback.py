"""The round engine's fallback when more than half the cohort drops: reselect, extend, abort."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.coordinator import (
    ClientFailed,
    CommitVersion,
    Coordinator,
    DeadlineReached,
    DropFallback,
    FallbackKind,
    Phase,
    RoundClosed,
    RoundSettings,
    RoundState,
    ScheduleDeadline,
    SendEvaluateTask,
    SendFitTask,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.fallback import candidates_wanted
from shoal.core import ConfigError, Parameters
from shoal.privacy.coordinator import DpCoordinator, DpSettings
from shoal.privacy.noise import NoiseSource

CANDIDATES = tuple(f"c{index:02d}" for index in range(30))
SIZE = 3
START, DEADLINE_S = 10.0, 100.0  # the deadline is at 110


def make(kind: str, *, target: int = 10, quorum: float = 0.8, **options: float) -> Coordinator:
    fallback = DropFallback(kind=FallbackKind(kind), **options)  # type: ignore[arg-type]
    return Coordinator(
        settings=RoundSettings(
            clients_per_round=target,
            quorum=quorum,
            deadline_s=DEADLINE_S,
            evaluation_clients=4,
            fallback=fallback,
        ),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE)]),
        seed=3,
    )


def start(coordinator: Coordinator, phase: Phase = Phase.FIT) -> list[str]:
    actions = coordinator.handle(StartRound(1, phase, START, CANDIDATES))
    return [a.client_id for a in actions if isinstance(a, SendFitTask | SendEvaluateTask)]


def fail(coordinator: Coordinator, clients: list[str], at: float = 20.0) -> list[object]:
    actions: list[object] = []
    for client in clients:
        actions += coordinator.handle(ClientFailed(client, 1, at, "battery"))
    return actions


def update(client: str, at: float = 30.0) -> UpdateReceived:
    return UpdateReceived(client, 1, at, np.ones(SIZE, np.float32), 10)


def tasks(actions: list[object]) -> list[str]:
    return [a.client_id for a in actions if isinstance(a, SendFitTask | SendEvaluateTask)]


def closed(actions: list[object]) -> RoundClosed:
    return next(a for a in actions if isinstance(a, RoundClosed))


# --- the threshold -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reselect", "extend", "abort", "none"])
def test_half_the_cohort_dropping_takes_no_fallback(kind: str) -> None:
    coordinator = make(kind, target=10)  # a cohort of 13: 6 is not more than half
    cohort = start(coordinator)
    assert len(cohort) == 13
    assert fail(coordinator, cohort[:6]) == []
    assert coordinator.state is RoundState.COLLECTING
    for client in cohort[6:]:
        coordinator.handle(update(client))
    assert coordinator.state is RoundState.IDLE  # every member answered: the round closed
    assert coordinator.last_round == 1


def test_the_threshold_is_configurable() -> None:
    coordinator = make("abort", target=10, at=0.2)  # more than 2.6 of 13: the third drop
    cohort = start(coordinator)
    assert fail(coordinator, cohort[:2]) == []
    summary = closed(fail(coordinator, cohort[2:3])).summary
    assert summary.fallback is not None and summary.fallback.dropped == 3


# --- reselect ------------------------------------------------------------------------------


def test_reselect_asks_a_replacement_for_every_drop_from_clients_not_asked() -> None:
    coordinator = make("reselect")
    cohort = start(coordinator)
    assert fail(coordinator, cohort[:6]) == []
    replacements = tasks(fail(coordinator, cohort[6:7]))  # the 7th drop: more than half
    assert len(replacements) == 7
    assert not set(replacements) & set(cohort)
    assert set(replacements) <= set(CANDIDATES)
    later = tasks(fail(coordinator, cohort[7:8], at=30.0))  # a drop after that: one more
    assert len(later) == 1 and not set(later) & {*cohort, *replacements}
    actions: list[object] = []
    for client in [*cohort[8:], *replacements]:
        actions += coordinator.handle(update(client, at=40.0))
    summary = closed(actions).summary
    assert summary.committed and summary.reported == 10  # the target, thanks to replacements
    assert summary.selected == 13 + 8
    report = summary.fallback
    assert report is not None
    assert (report.kind, report.configured, report.dropped, report.cohort) == (
        "reselect",
        "reselect",
        7,
        13,
    )
    assert report.replacements == 8 and report.at == 20.0


def test_a_replacement_is_a_cohort_member_whose_answer_counts() -> None:
    coordinator = make("reselect", target=2)  # a cohort of 3
    cohort = start(coordinator)
    replacements = tasks(fail(coordinator, cohort[:2]))
    assert len(replacements) == 2
    coordinator.handle(update(cohort[2]))
    summary = closed(coordinator.handle(update(replacements[0]))).summary
    assert summary.committed and set(summary.participants) == {cohort[2], replacements[0]}


def test_the_replacements_are_drawn_from_the_run_seed() -> None:
    first, second = make("reselect"), make("reselect")
    cohort = start(first)
    assert start(second) == cohort
    assert tasks(fail(first, cohort[:7])) == tasks(fail(second, cohort[:7]))


def test_no_replacement_once_too_little_of_the_deadline_is_left() -> None:
    coordinator = make("reselect", reselect_min_left=0.5)  # at least 50 s of the 100 s
    cohort = start(coordinator)
    assert tasks(fail(coordinator, cohort[:7], at=60.5)) == []  # 49.5 s left
    summary = closed(coordinator.handle(DeadlineReached(1, 110.0))).summary
    assert not summary.committed
    assert summary.fallback is not None and summary.fallback.replacements == 0
    assert summary.fallback.note is not None and "no replacement" in summary.fallback.note


def test_just_enough_time_left_still_asks_replacements() -> None:
    coordinator = make("reselect", reselect_min_left=0.5)
    cohort = start(coordinator)
    assert len(tasks(fail(coordinator, cohort[:7], at=60.0))) == 7  # exactly 50 s left


def test_reselect_with_no_client_left_to_ask_says_so() -> None:
    coordinator = make("reselect", target=10)
    actions = coordinator.handle(StartRound(1, Phase.FIT, START, CANDIDATES[:14]))
    cohort = tasks(actions)
    replacements = tasks(fail(coordinator, cohort[:7]))
    assert len(replacements) == 1  # the only candidate never asked
    summary = closed(coordinator.handle(DeadlineReached(1, 110.0))).summary
    assert summary.fallback is not None and summary.fallback.note is not None
    assert "ran out" in summary.fallback.note


def test_reselect_works_in_an_evaluation_round() -> None:
    coordinator = make("reselect")  # evaluation_clients = 4: a cohort of 6
    cohort = start(coordinator, Phase.EVALUATE)
    replacements = tasks(fail(coordinator, cohort[:4]))
    assert len(replacements) == 4 and not set(replacements) & set(cohort)


def test_a_private_round_extends_instead_of_reselecting() -> None:
    coordinator = make("reselect")
    settings = DpSettings("central", 1.0, 1.0, clients_per_round=10, min_clients=8)
    coordinator.privacy = DpCoordinator(settings, NoiseSource.secure())
    cohort = start(coordinator)
    actions = fail(coordinator, cohort[:7])
    assert tasks(actions) == []
    assert ScheduleDeadline(round=1, at=210.0) in actions
    report = coordinator._round.fallback  # type: ignore[union-attr]
    assert report is not None and report.kind is FallbackKind.EXTEND
    assert report.configured is FallbackKind.RESELECT and "accountant" in (report.note or "")


# --- extend --------------------------------------------------------------------------------


def test_extend_moves_the_deadline_once_and_the_old_timer_is_stale() -> None:
    coordinator = make("extend", extend_s=50.0)
    cohort = start(coordinator)
    actions = fail(coordinator, cohort[:7])
    assert actions == [ScheduleDeadline(round=1, at=160.0)]
    assert fail(coordinator, cohort[7:9], at=30.0) == []  # never a second extension
    assert coordinator.handle(DeadlineReached(1, 110.0)) == []  # the first deadline's timer
    coordinator.handle(update(cohort[9], at=150.0))  # a late member still counts
    summary = closed(coordinator.handle(DeadlineReached(1, 160.0))).summary
    assert summary.reported == 1 and summary.closed_at == 160.0
    assert summary.fallback is not None and summary.fallback.extended_by_s == 50.0


def test_extend_defaults_to_one_more_deadline() -> None:
    coordinator = make("extend")
    cohort = start(coordinator)
    assert fail(coordinator, cohort[:7]) == [ScheduleDeadline(round=1, at=210.0)]


# --- abort and none ------------------------------------------------------------------------


def test_abort_closes_the_round_at_once_and_keeps_the_model() -> None:
    coordinator = make("abort")
    before = coordinator.parameters
    cohort = start(coordinator)
    coordinator.handle(update(cohort[12], at=15.0))
    fail(coordinator, cohort[:6])
    actions = fail(coordinator, cohort[6:7], at=25.0)
    assert not any(isinstance(a, CommitVersion) for a in actions)
    summary = closed(actions).summary
    assert not summary.committed and summary.closed_at == 25.0
    assert summary.abort_reason is not None and "7 of the 13" in summary.abort_reason
    assert coordinator.parameters is before
    assert coordinator.state is RoundState.IDLE
    assert coordinator.handle(DeadlineReached(1, 110.0)) == []  # its timer is stale
    late = coordinator.handle(update(cohort[11], at=30.0))
    assert [type(a).__name__ for a in late] == ["RejectSubmission"]


def test_none_waits_for_the_deadline_but_reports_the_drop() -> None:
    coordinator = make("none")
    cohort = start(coordinator)
    assert fail(coordinator, cohort[:7]) == []
    summary = closed(coordinator.handle(DeadlineReached(1, 110.0))).summary
    assert summary.fallback is not None and summary.fallback.kind == "none"
    assert summary.fallback.fields()["replacements"] == 0


def test_an_invalid_update_is_not_a_drop() -> None:
    coordinator = make("abort")
    cohort = start(coordinator)
    for client in cohort[:7]:
        bad = UpdateReceived(client, 1, 20.0, np.full(SIZE, np.nan, np.float32), 10)
        coordinator.handle(bad)
    assert coordinator.state is RoundState.COLLECTING  # refused updates, not drops


# --- the settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"at": 1.0}, "drop_fallback_at"),
        ({"at": -0.1}, "drop_fallback_at"),
        ({"extend_s": 0.0}, "drop_extend_s"),
        ({"extend_s": float("nan")}, "drop_extend_s"),
        ({"reselect_min_left": 0.0}, "drop_reselect_min_left"),
        ({"reselect_min_left": 1.5}, "drop_reselect_min_left"),
    ],
)
def test_bad_fallback_settings_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DropFallback(**options)  # type: ignore[arg-type]


def test_the_threshold_of_an_empty_cohort_never_triggers() -> None:
    assert not DropFallback().triggered(dropped=0, cohort=0)
    assert not DropFallback(at=0.0).triggered(dropped=0, cohort=5)
    assert DropFallback(at=0.0).triggered(dropped=1, cohort=5)


def test_a_secure_round_aborts_or_lets_its_protocol_recover() -> None:
    fallback = DropFallback(kind=FallbackKind.RESELECT)
    kind, note = fallback.for_round(secure=True, private=False, reachable=True)
    assert kind is FallbackKind.NONE and note is not None
    kind, _ = fallback.for_round(secure=True, private=False, reachable=False)
    assert kind is FallbackKind.ABORT
    abort = DropFallback(kind=FallbackKind.ABORT)
    assert abort.for_round(secure=True, private=False, reachable=True) == (FallbackKind.ABORT, None)


def test_a_live_coordinator_lists_a_reserve_only_to_reselect() -> None:
    assert candidates_wanted(cohort=13, fallback=DropFallback()) == 26
    extend = DropFallback(kind=FallbackKind.EXTEND)
    assert candidates_wanted(cohort=13, fallback=extend) == 13
    assert candidates_wanted(cohort=13, fallback=DropFallback(), secure=True) == 13


def test_a_client_cannot_set_off_the_fallback_alone_or_from_outside() -> None:
    """Repeated reports of one member, and reports of clients not asked, are refused, uncounted."""
    coordinator = make("abort")
    cohort = start(coordinator)
    outsider = next(client for client in CANDIDATES if client not in cohort)
    refused = [
        *fail(coordinator, [cohort[0]] * 7),  # the first counts, the six others are duplicates
        *fail(coordinator, [outsider] * 7),
        *[a for _ in range(7) for a in coordinator.handle(ClientFailed(cohort[1], 2, 20.0, "x"))],
    ]
    assert len(refused) == 6 + 7 + 7
    assert all(type(action).__name__ == "RejectSubmission" for action in refused)
    assert coordinator.state is RoundState.COLLECTING  # one drop counted, no fallback
    assert coordinator._round is not None and coordinator._round.fallback is None
