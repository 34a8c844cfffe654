"""The round engine: selection, collection, quorum, rejections, commit and abort."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from shoal.aggregation import measures
from shoal.aggregation.divergence import DivergenceRule
from shoal.aggregation.drift import DriftRule
from shoal.aggregation.strategy import make_strategy
from shoal.coordinator import (
    ClientFailed,
    CommitVersion,
    Coordinator,
    DeadlineReached,
    EvaluationReceived,
    Phase,
    RejectReason,
    RejectSubmission,
    RoundClosed,
    RoundSettings,
    RoundState,
    ScheduleDeadline,
    SendEvaluateTask,
    SendFitTask,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.events import Authentication
from shoal.coordinator.policy import Submission, UpdatePolicy
from shoal.core import ConfigError, IllegalTransition, Parameters, ProtocolError
from shoal.core.compression import Compression
from shoal.core.later import Later, Offload, here
from shoal.governance import Decision, PolicyBounds, PolicyEngine, UpdateFacts
from shoal.governance.policy import _ALONE_BELOW_S, _PROBE_EVERY, facts_for
from shoal.privacy.coordinator import CLIP_NORM, LOCAL_NOISE_STD, DpCoordinator, DpSettings
from shoal.privacy.noise import NoiseSource
from shoal.tasks import TRAIN_TIME_METRIC

CANDIDATES = tuple(f"c{index:02d}" for index in range(30))
SIZE = 4


def make(
    *,
    target: int = 5,
    quorum: float = 0.8,
    strategy: str = "fedavg",
    seed: int = 7,
    **options: float,
) -> Coordinator:
    return Coordinator(
        settings=RoundSettings(
            clients_per_round=target, quorum=quorum, deadline_s=100.0, evaluation_clients=4
        ),
        strategy=make_strategy(strategy, **options),  # type: ignore[arg-type]
        parameters=Parameters.from_arrays([np.zeros(SIZE)]),
        seed=seed,
    )


def start(coordinator: Coordinator, round_number: int = 1, phase: Phase = Phase.FIT) -> list[str]:
    actions = coordinator.handle(StartRound(round_number, phase, 10.0, CANDIDATES))
    return [a.client_id for a in actions if isinstance(a, SendFitTask | SendEvaluateTask)]


def update(
    client: str, value: float, *, round_number: int = 1, examples: int = 10
) -> UpdateReceived:
    return UpdateReceived(
        client, round_number, 20.0, np.full(SIZE, value, np.float32), examples, {"loss": value}
    )


def closed(actions: list[object]) -> RoundClosed:
    return next(a for a in actions if isinstance(a, RoundClosed))


def test_start_over_selects_and_schedules_the_deadline() -> None:
    coordinator = make(target=5)
    actions = coordinator.handle(StartRound(1, Phase.FIT, 10.0, CANDIDATES))
    tasks = [a for a in actions if isinstance(a, SendFitTask)]
    assert len(tasks) == math.ceil(5 * 1.3)
    assert len({task.client_id for task in tasks}) == len(tasks)
    assert {task.config.seed for task in tasks}.__len__() == len(tasks)
    assert ScheduleDeadline(round=1, at=110.0) in actions
    assert coordinator.state is RoundState.COLLECTING


def test_selection_is_deterministic_per_seed_and_round() -> None:
    assert start(make(seed=3)) == start(make(seed=3))
    assert start(make(seed=3)) != start(make(seed=4))
    assert start(make(seed=3), round_number=1) != start(make(seed=3), round_number=2)


def test_target_count_commits_the_weighted_mean() -> None:
    coordinator = make(target=3)
    cohort = start(coordinator)
    actions: list[object] = []
    for client, (value, examples) in zip(cohort, [(1.0, 10), (2.0, 30), (4.0, 60)], strict=False):
        actions = coordinator.handle(update(client, value, examples=examples))
    commit = next(a for a in actions if isinstance(a, CommitVersion))
    expected = (1 * 10 + 2 * 30 + 4 * 60) / 100
    np.testing.assert_allclose(commit.parameters.vector, expected, rtol=1e-6)
    summary = closed(actions).summary
    assert summary.committed and summary.reported == 3 and summary.outstanding == len(cohort) - 3
    assert summary.loss == pytest.approx(expected)
    assert coordinator.state is RoundState.IDLE


def test_deadline_with_quorum_aggregates_partial_results() -> None:
    coordinator = make(target=5, quorum=0.6)
    cohort = start(coordinator)
    for client in cohort[:3]:
        assert coordinator.handle(update(client, 1.0)) == []
    summary = closed(coordinator.handle(DeadlineReached(1, 110.0))).summary
    assert summary.committed and summary.reported == 3
    np.testing.assert_allclose(coordinator.parameters.vector, 1.0)


def test_deadline_below_quorum_aborts_and_keeps_the_model() -> None:
    coordinator = make(target=5, quorum=0.8)
    cohort = start(coordinator)
    for client in cohort[:3]:
        coordinator.handle(update(client, 1.0))
    actions = coordinator.handle(DeadlineReached(1, 110.0))
    summary = closed(actions).summary
    assert not summary.committed and "quorum is 4" in (summary.abort_reason or "")
    assert not any(isinstance(a, CommitVersion) for a in actions)
    np.testing.assert_array_equal(coordinator.parameters.vector, 0.0)
    assert coordinator.state is RoundState.IDLE


def test_too_few_candidates_aborts_at_once() -> None:
    coordinator = make(target=5)
    actions = coordinator.handle(StartRound(1, Phase.FIT, 0.0, CANDIDATES[:2]))
    summary = closed(actions).summary
    assert not summary.committed and summary.selected == 2
    assert coordinator.state is RoundState.IDLE


@pytest.mark.parametrize(
    ("make_event", "reason"),
    [
        (lambda cohort: update(cohort[0], 1.0, round_number=2), RejectReason.WRONG_ROUND),
        (lambda cohort: update(cohort[0], 1.0, round_number=0), RejectReason.LATE),
        (lambda cohort: update("stranger", 1.0), RejectReason.NOT_SELECTED),
        (lambda cohort: EvaluationReceived(cohort[0], 1, 5.0, 0.1, 3), RejectReason.WRONG_PHASE),
        (lambda cohort: update(cohort[0], float("nan")), RejectReason.INVALID_UPDATE),
        (
            lambda cohort: UpdateReceived(cohort[0], 1, 5.0, np.zeros(SIZE + 1, np.float32), 3),
            RejectReason.INVALID_UPDATE,
        ),
        (
            lambda cohort: UpdateReceived(cohort[0], 1, 5.0, np.zeros(SIZE, np.float64), 3),
            RejectReason.INVALID_UPDATE,
        ),
        (lambda cohort: update(cohort[0], 1.0, examples=0), RejectReason.INVALID_UPDATE),
    ],
)
def test_bad_submissions_are_rejected_and_counted(make_event: object, reason: RejectReason) -> None:
    coordinator = make()
    cohort = start(coordinator)
    actions = coordinator.handle(make_event(cohort))  # type: ignore[operator]
    rejection = next(a for a in actions if isinstance(a, RejectSubmission))
    assert rejection.reason is reason and rejection.detail
    assert coordinator.rejections[reason.value] == 1
    assert coordinator.state is RoundState.COLLECTING
    np.testing.assert_array_equal(coordinator.parameters.vector, 0.0)


def test_duplicate_and_late_submissions() -> None:
    coordinator = make(target=2)
    cohort = start(coordinator)
    coordinator.handle(update(cohort[0], 1.0))
    duplicate = coordinator.handle(update(cohort[0], 1.0))
    assert (
        isinstance(duplicate[0], RejectSubmission) and duplicate[0].reason is RejectReason.DUPLICATE
    )
    summary = closed(coordinator.handle(update(cohort[1], 1.0))).summary
    assert summary.rejected == {"duplicate": 1}
    late = coordinator.handle(update(cohort[2], 1.0))
    assert isinstance(late[0], RejectSubmission) and late[0].reason is RejectReason.LATE
    assert coordinator.rejections == {"duplicate": 1, "late": 1}


def test_failures_are_counted_and_close_the_round_when_everyone_answered() -> None:
    coordinator = make(target=3, quorum=0.5)
    cohort = start(coordinator)
    actions: list[object] = []
    for client in cohort[:-2]:
        actions = coordinator.handle(ClientFailed(client, 1, 30.0, "out of memory"))
    for client in cohort[-2:]:
        actions = coordinator.handle(update(client, 2.0))
    summary = closed(actions).summary
    assert summary.committed and summary.failed == len(cohort) - 2 and summary.reported == 2


@pytest.mark.parametrize(
    ("client", "round_number", "reason"),
    [
        ("stranger", 1, RejectReason.NOT_SELECTED),
        (None, 9, RejectReason.WRONG_ROUND),  # a round to come
        (None, 0, RejectReason.LATE),  # a round gone by
    ],
)
def test_failures_from_outside_the_round_are_rejected_and_change_nothing(
    client: str | None, round_number: int, reason: RejectReason
) -> None:
    coordinator = make()
    cohort = start(coordinator)
    [rejection] = coordinator.handle(ClientFailed(client or cohort[0], round_number, 30.0, "x"))
    assert isinstance(rejection, RejectSubmission) and rejection.reason is reason
    assert coordinator.handle(DeadlineReached(9, 30.0)) == []
    assert coordinator.state is RoundState.COLLECTING
    for member in cohort[:5]:  # the client's task stands: the round goes on as if nothing happened
        actions = coordinator.handle(update(member, 1.0))
    summary = closed(actions).summary
    assert summary.committed and (summary.reported, summary.failed) == (5, 0)
    assert summary.rejected == {reason.value: 1} and summary.failures == {}


def test_a_failure_is_counted_once() -> None:
    coordinator = make()
    cohort = start(coordinator)
    assert coordinator.handle(ClientFailed(cohort[0], 1, 30.0, "out of memory")) == []
    [again] = coordinator.handle(ClientFailed(cohort[0], 1, 31.0, "out of memory"))
    assert isinstance(again, RejectSubmission) and again.reason is RejectReason.DUPLICATE
    summary = closed(coordinator.handle(DeadlineReached(1, 110.0))).summary
    assert summary.failures == {"out of memory": 1}


def test_a_failure_between_rounds_is_late() -> None:
    coordinator = make(target=1, quorum=1.0)
    [client, *_] = start(coordinator)
    coordinator.handle(update(client, 1.0))
    assert coordinator.state is RoundState.IDLE
    [rejection] = coordinator.handle(ClientFailed(client, 1, 40.0, "x"))
    assert isinstance(rejection, RejectSubmission) and rejection.reason is RejectReason.LATE


def bounded(*, policy: UpdatePolicy | None = None, **limits: float) -> Coordinator:
    return Coordinator(
        settings=RoundSettings(clients_per_round=2, quorum=0.5, deadline_s=100.0, **limits),  # type: ignore[arg-type]
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE)]),
        seed=7,
        policy=policy,
    )


@pytest.mark.parametrize(
    ("values", "examples", "problem"),
    [
        (np.array([1.0, np.nan, 0.0, 0.0], np.float32), 10, "NaN or infinite"),
        (np.array([1.0, -np.inf, 0.0, 0.0], np.float32), 10, "NaN or infinite"),
        (np.ones(SIZE + 1, np.float32), 10, "the model has 4 values"),
        (np.ones(SIZE, np.float64), 10, "expected float32"),
        (np.ones(SIZE, np.float32), 0, "zero examples"),
    ],
)
def test_malformed_updates_are_rejected_counted_and_leave_the_model_alone(
    values: np.ndarray, examples: int, problem: str
) -> None:
    coordinator = bounded(policy=FactsPolicy())  # refused before the policy is asked
    attacker, honest, *_ = start(coordinator)
    [rejection] = coordinator.handle(UpdateReceived(attacker, 1, 20.0, values, examples))
    assert isinstance(rejection, RejectSubmission)
    assert rejection.reason is RejectReason.INVALID_UPDATE and problem in rejection.detail
    coordinator.handle(signed(honest, np.full(SIZE, 2.0, np.float32)))
    summary = closed(coordinator.handle(DeadlineReached(1, 110.0))).summary
    assert summary.failed == 1 and sum(summary.failures.values()) == 1
    assert summary.rejected == {"invalid_update": 1} and summary.policy_decisions == 1
    assert summary.committed and summary.participants == (honest,)
    np.testing.assert_array_equal(coordinator.parameters.vector, 2.0)  # the honest update alone


class FactsPolicy:
    """The real compiled policy, on facts made from the submissions alone (no registry)."""

    def __init__(self, **bounds: float) -> None:
        self.engine = PolicyEngine(bounds=PolicyBounds(**bounds))  # type: ignore[arg-type]
        self.asked: list[tuple[int, list[Submission]]] = []

    def decide(
        self,
        round_number: int,
        submissions: Sequence[Submission],
        *,
        meanwhile: Callable[[], object] | None = None,
    ) -> list[Decision]:
        self.asked.append((round_number, list(submissions)))
        batch = [
            UpdateFacts(
                client_id=s.client_id,
                signature=s.authentication.value,
                sealed=s.sealed,
                l2_norm=s.l2_norm,
                relative_l2_norm=s.relative_l2_norm,
                num_examples=s.num_examples,
            )
            for s in submissions
        ]
        return self.engine.decide(round_number, batch, meanwhile=meanwhile)


def signed(client: str, values: np.ndarray, examples: int = 10) -> UpdateReceived:
    return UpdateReceived(
        client, 1, 20.0, values, examples, {}, authentication=Authentication.VERIFIED
    )


@pytest.mark.parametrize(
    ("values", "examples", "code"),
    [
        (np.full(SIZE, 1e30, np.float32), 10, "l2_norm_above_bound"),  # finite: well formed
        (np.full(SIZE, -3e6, np.float32), 10, "l2_norm_above_bound"),
        (np.ones(SIZE, np.float32), 2**63 - 1, "examples_above_cap"),
        (np.ones(SIZE, np.float32), 10_000_001, "examples_above_cap"),
    ],
)
def test_the_policy_denies_out_of_bound_updates_when_the_round_aggregates(
    values: np.ndarray, examples: int, code: str
) -> None:
    policy = FactsPolicy()
    coordinator = bounded(policy=policy)
    attacker, honest, *_ = start(coordinator)
    assert coordinator.handle(signed(attacker, values, examples)) == []  # taken, not yet judged
    actions = coordinator.handle(signed(honest, np.full(SIZE, 2.0, np.float32), 10_000_000))
    summary = closed(actions).summary  # the target reached: both decided in one query
    assert [len(batch) for _, batch in policy.asked] == [2]
    assert summary.policy_decisions == 2 and summary.policy_denied == {code: 1}
    assert summary.failures == {f"policy denied: {code}": 1} and summary.rejected == {}
    assert summary.committed and summary.participants == (honest,)
    np.testing.assert_array_equal(coordinator.parameters.vector, 2.0)  # the honest update alone


def test_the_policy_denies_an_update_far_above_the_rounds_median_norm() -> None:
    policy = FactsPolicy(max_l2_norm=1e6, max_relative_l2_norm=10.0)
    coordinator = make(target=4, quorum=0.5)
    coordinator.policy = policy
    clients = start(coordinator)[:4]
    actions: list[object] = []
    for client, value in zip(clients, [1.0, 1.5, 2.0, 30.0], strict=True):
        actions = coordinator.handle(signed(client, np.full(SIZE, value, np.float32)))
    summary = closed(actions).summary  # the fourth reached the target
    [(_, batch)] = policy.asked
    assert [s.relative_l2_norm for s in batch] == pytest.approx([0.571, 0.857, 1.143, 17.14], 1e-3)
    assert summary.policy_denied == {"relative_l2_norm_above_bound": 1}
    assert clients[3] not in summary.participants and len(summary.participants) == 3


def test_an_update_the_shell_did_not_authenticate_is_denied() -> None:
    coordinator = bounded(policy=FactsPolicy())
    first, second, *_ = start(coordinator)
    coordinator.handle(update(first, 1.0))  # Authentication.NONE: no shell vouched for it
    summary = closed(coordinator.handle(signed(second, np.ones(SIZE, np.float32)))).summary
    assert summary.policy_denied == {"signature_unverified": 1}
    assert summary.participants == (second,)


def test_denials_can_cost_the_round_its_quorum() -> None:
    coordinator = bounded(policy=FactsPolicy())
    first, second, *_ = start(coordinator)
    coordinator.handle(signed(first, np.full(SIZE, 1e30, np.float32)))
    summary = closed(coordinator.handle(signed(second, np.full(SIZE, 1e30, np.float32)))).summary
    assert not summary.committed and summary.abort_reason == "0 of 2 reported, the quorum is 1"
    np.testing.assert_array_equal(coordinator.parameters.vector, 0.0)


def test_an_evaluation_with_too_many_examples_is_rejected() -> None:
    coordinator = bounded(max_examples_per_client=100)
    [client, *_] = start(coordinator, phase=Phase.EVALUATE)
    [rejection] = coordinator.handle(EvaluationReceived(client, 1, 20.0, 0.5, 2**63 - 1))
    assert isinstance(rejection, RejectSubmission)
    assert rejection.reason is RejectReason.INVALID_UPDATE and "bound of 100" in rejection.detail


def test_round_settings_refuse_an_evaluation_cap_that_bounds_nothing() -> None:
    with pytest.raises(ConfigError, match="max_examples_per_client"):
        RoundSettings(clients_per_round=2, max_examples_per_client=0)


def test_stale_deadline_between_rounds_is_ignored() -> None:
    coordinator = make(target=1)
    cohort = start(coordinator)
    coordinator.handle(update(cohort[0], 1.0))
    assert coordinator.handle(DeadlineReached(1, 110.0)) == []
    assert coordinator.state is RoundState.IDLE


def test_evaluation_round_weights_metrics_by_examples() -> None:
    coordinator = make()
    cohort = start(coordinator, phase=Phase.EVALUATE)
    assert len(cohort) == math.ceil(4 * 1.3)
    actions: list[object] = []
    for client, (loss, accuracy, examples) in zip(
        cohort, [(1.0, 0.5, 10), (2.0, 1.0, 30), (0.0, 0.0, 0), (4.0, 0.25, 60)], strict=False
    ):
        actions = coordinator.handle(
            EvaluationReceived(client, 1, 50.0, loss, examples, {"accuracy": accuracy})
        )
    summary = closed(actions).summary
    assert summary.phase is Phase.EVALUATE and summary.committed
    assert summary.loss == pytest.approx((10 + 60 + 240) / 100)
    assert summary.metrics["accuracy"] == pytest.approx((5 + 30 + 15) / 100)
    assert not any(isinstance(a, CommitVersion) for a in actions)


def test_aggregation_failure_aborts_the_round_and_the_coordinator_goes_on() -> None:
    coordinator = make(target=3, quorum=0.5, strategy="krum")
    cohort = start(coordinator)
    actions: list[object] = []
    for client in cohort[:3]:
        actions = coordinator.handle(update(client, 1.0))
    summary = closed(actions).summary
    assert not summary.committed and "2f + 2 < n - m" in (summary.abort_reason or "").replace(
        "·", ""
    )
    assert coordinator.state is RoundState.IDLE
    start(coordinator, round_number=2)
    assert coordinator.state is RoundState.COLLECTING


def test_server_momentum_carries_across_rounds() -> None:
    coordinator = make(target=1, quorum=1.0, strategy="fedavgm", server_momentum=0.5)
    for round_number in (1, 2):
        cohort = start(coordinator, round_number=round_number)
        coordinator.handle(update(cohort[0], 1.0, round_number=round_number))
    np.testing.assert_allclose(coordinator.parameters.vector, 1.0 + 1.5)


def test_restore_only_between_rounds() -> None:
    coordinator = make()
    replacement = Parameters.from_arrays([np.ones(SIZE)])
    coordinator.restore(replacement)
    np.testing.assert_array_equal(coordinator.parameters.vector, 1.0)
    start(coordinator)
    with pytest.raises(IllegalTransition):
        coordinator.restore(replacement)


# --- fleet telemetry: what the engine books of each client --------------------------------


def test_the_round_books_each_clients_round_trip_training_time_and_drop_reason() -> None:
    coordinator = make(target=5, quorum=0.4)
    cohort = start(coordinator)  # 7 tasks leave at t=10, the deadline is at 110
    first, second, third, *rest = cohort
    train = {TRAIN_TIME_METRIC: 4.0, "loss": 1.0}
    coordinator.handle(UpdateReceived(first, 1, 15.0, np.ones(SIZE, np.float32), 10, train))
    coordinator.handle(ClientFailed(second, 1, 16.0, "the device dropped out", kind="dropped"))
    bad = np.full(SIZE, np.nan, np.float32)
    coordinator.handle(UpdateReceived(third, 1, 17.0, bad, 10))
    coordinator.handle(UpdateReceived(rest[0], 1, 30.0, np.ones(SIZE, np.float32), 10))
    summary = closed(coordinator.handle(DeadlineReached(1, 110.0))).summary
    report = summary.fleet
    assert report is not None
    assert sorted(report.round_trips) == [5.0, 20.0]
    assert report.windows == (100.0, 100.0)
    assert report.training == (4.0,)  # the other client reported none
    assert report.drops == {
        "deadline": len(cohort) - 4,
        "failed:dropped": 1,
        "rejected:invalid_update": 1,
    }
    assert "shoal_train_s" not in summary.metrics  # reserved: never a metric of the round


def test_an_evaluation_books_each_clients_accuracy() -> None:
    coordinator = make()
    cohort = start(coordinator, phase=Phase.EVALUATE)
    answering = cohort[:4]  # the round's target: it closes on the fourth
    for index, client in enumerate(answering):
        event = EvaluationReceived(client, 1, 12.0, 0.5, 10 + index, {"accuracy": 0.25 * index})
        actions = coordinator.handle(event)
    report = closed(actions).summary.fleet
    assert report is not None
    assert report.evaluations == {
        client: (10 + index, 0.25 * index) for index, client in enumerate(answering)
    }
    assert report.drops == {"surplus": len(cohort) - 4}  # asked, not waited for


def test_without_telemetry_the_engine_books_nothing() -> None:
    coordinator = Coordinator(
        settings=RoundSettings(clients_per_round=2, deadline_s=100.0),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE)]),
        seed=1,
        telemetry=False,
    )
    start(coordinator)
    assert closed(coordinator.handle(DeadlineReached(1, 110.0))).summary.fleet is None


def test_a_failure_kind_is_a_short_word() -> None:
    with pytest.raises(ProtocolError, match="short word"):
        ClientFailed("c00", 1, 0.0, "gone", kind="a reason with spaces")


class UnhurriedPolicy(FactsPolicy):
    """The same policy, never running the engine's work beside its query."""

    def decide(
        self,
        round_number: int,
        submissions: Sequence[Submission],
        *,
        meanwhile: Callable[[], object] | None = None,
    ) -> list[Decision]:
        return super().decide(round_number, submissions)


def six_updates(seed: int, *, poisoned: int | None = None) -> list[np.ndarray]:
    """Six random updates; the one at ``poisoned`` (if any) past every norm bound."""
    rng = np.random.default_rng(seed)
    values = [rng.normal(size=SIZE).astype(np.float32) for _ in range(6)]
    if poisoned is not None:
        values[poisoned] = np.full(SIZE, 1e30, np.float32)
    return values


def measured(
    policy: UpdatePolicy, values: list[np.ndarray], offload: Offload = here
) -> tuple[np.ndarray, object]:
    """The model after one round of ``values`` under ``policy``, and the round's summary."""
    coordinator = Coordinator(
        settings=RoundSettings(clients_per_round=len(values), quorum=0.5, deadline_s=100.0),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE)]),
        seed=7,
        policy=policy,
        divergence=DivergenceRule(),
        drift=DriftRule(),
    )
    coordinator.offload = offload
    clients = start(coordinator)
    actions: list[object] = []
    for index, (client, value) in enumerate(zip(clients, values, strict=False)):
        actions = coordinator.handle(signed(client, value, examples=10 + index))
    return coordinator.parameters.vector.copy(), closed(actions).summary


@pytest.mark.parametrize("poisoned", [False, True])
def test_the_round_worked_out_beside_the_policys_query_is_the_round_worked_out_after_it(
    poisoned: bool,
) -> None:
    # poisoned, denied: the work done beside the query is thrown away
    values = six_updates(3, poisoned=2 if poisoned else None)
    beside, beside_summary = measured(FactsPolicy(), values)
    after, after_summary = measured(UnhurriedPolicy(), values)
    np.testing.assert_array_equal(beside, after)
    assert beside_summary == after_summary  # the same divergence, drift and books
    assert len(after_summary.participants) == (5 if poisoned else 6)
    assert after_summary.divergence is not None and after_summary.drift is not None
    assert after_summary.divergence.available and after_summary.drift.available


def test_an_aggregate_that_fails_beside_the_query_fails_the_round_as_it_always_did() -> None:
    huge = [np.full(SIZE, 3e37, np.float32) for _ in range(4)]  # each within the bounds
    policy = FactsPolicy(max_l2_norm=1e38, max_relative_l2_norm=10.0)
    _, beside = measured(policy, huge)  # the weighted sum overflows float32
    _, after = measured(UnhurriedPolicy(max_l2_norm=1e38, max_relative_l2_norm=10.0), huge)
    assert not beside.committed and beside.abort_reason == after.abort_reason
    assert beside.abort_reason is not None and "not finite" in beside.abort_reason


def test_the_engines_work_runs_beside_the_query_once_on_the_callers_thread() -> None:
    engine = PolicyEngine()
    batch = [facts_for(f"c{index}", l2_norm=float(index)) for index in range(200)]  # two chunks
    threads: list[int] = []
    decisions = engine.decide(1, batch, meanwhile=lambda: threads.append(threading.get_ident()))
    assert threads == [threading.get_ident()] and len(decisions) == 200
    assert decisions == engine.decide(1, batch)  # the same decisions without it

    def broken() -> None:
        raise RuntimeError("the engine's own bug")

    with pytest.raises(RuntimeError, match="own bug"):
        engine.decide(1, batch, meanwhile=broken)
    assert engine.decide(1, batch[:3]) == decisions[:3]  # the interpreter is free again
    engine.close()


def test_a_query_quicker_than_the_handover_runs_first_and_a_slow_one_beside() -> None:
    engine = PolicyEngine()
    batch = [facts_for(f"c{index}", l2_norm=float(index)) for index in range(20)]
    threads: list[int] = []
    decisions = engine.decide(1, batch, meanwhile=lambda: threads.append(threading.get_ident()))
    assert engine._last_alone_s == 0  # the first query, cold, is not the measure
    second = engine.decide(1, batch, meanwhile=lambda: threads.append(threading.get_ident()))
    # the default's guarded query on a clean batch: alone
    assert second == decisions and engine._thread is None
    assert threads == [threading.get_ident()] * 2 and 0 < engine._last_alone_s < _ALONE_BELOW_S
    engine._last_alone_s = 1.0  # as a slow policy's query measures
    for _ in range(_PROBE_EVERY):
        assert engine.decide(1, batch, meanwhile=lambda: None) == decisions
        assert engine._thread is not None and engine._last_alone_s == 1.0  # beside
    assert engine.decide(1, batch, meanwhile=lambda: None) == decisions
    assert engine._last_alone_s < 1.0  # measured alone again: the next ones run alone
    engine.close()


class _Watched:
    """A policy engine's interpreter that notes when a query went in."""

    def __init__(self, interpreter: Any, entered: list[str]) -> None:
        self.interpreter, self.entered = interpreter, entered

    def __getattr__(self, name: str) -> Any:
        return getattr(self.interpreter, name)

    def query_bundle_entrypoint(self, *args: Any) -> Any:
        self.entered.append("query")
        return self.interpreter.query_bundle_entrypoint(*args)


def test_the_caller_hands_over_until_a_query_that_takes_the_longer_has_started() -> None:
    # busy with its own work, the caller would keep Python's lock and the query would start
    # late; when the query was the longer last time, the caller waits until it is in rego-cpp
    engine = PolicyEngine()
    batch = [facts_for(f"c{index}", l2_norm=float(index)) for index in range(20)]
    entered: list[str] = []
    engine._interpreter = _Watched(engine._interpreter, entered)  # type: ignore[assignment]
    engine.decide(1, batch, meanwhile=lambda: None)  # the engine's thread exists from now on
    for _ in range(5):
        entered.clear()
        engine._last_query_s, engine._last_meanwhile_s = 1.0, 0.0
        engine._last_alone_s, engine._besides = 1.0, 0  # a query that is best beside
        engine.decide(1, batch, meanwhile=lambda: entered.append("meanwhile"))
        assert entered == ["query", "meanwhile"]
        # each side's time is kept for the next decision
        assert 0 < engine._last_query_s < 1.0 and engine._last_meanwhile_s > 0
    engine.close()


def test_a_measure_that_breaks_on_a_denied_update_never_fails_the_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the work beside the policy's query sees every update, the denied ones too: a measure
    # that cannot take a hostile one must cost that work, never the round
    real = measures.measure_drift
    hostile: list[bool] = []

    def fragile(names: Sequence[str], updates: np.ndarray, **options: object) -> object:
        hostile.append(bool(np.abs(updates).max() > 1e20))
        if hostile[-1]:
            raise np.linalg.LinAlgError("did not converge")
        return real(names, updates, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(measures, "measure_drift", fragile)
    values = six_updates(5, poisoned=4)  # denied: above the norm bound
    model, summary = measured(FactsPolicy(), values)
    unhurried, expected = measured(UnhurriedPolicy(), values)  # never guesses
    assert (
        summary.committed
        and summary.failed == 1
        and "l2_norm_above_bound" in (summary.policy_denied)
    )
    assert summary.drift is not None and summary.drift.available
    assert len(summary.drift.clients) == 5  # measured on the allowed updates alone
    assert hostile[0] and not hostile[-1]  # the guess met the hostile update, then not
    np.testing.assert_array_equal(model, unhurried)
    assert summary == expected


@pytest.mark.parametrize("poisoned", [False, True])
def test_measures_sent_elsewhere_start_before_the_policy_decides_and_change_nothing(
    poisoned: bool,
) -> None:
    # poisoned, denied: the measures sent for every update are thrown away
    values = six_updates(4, poisoned=1 if poisoned else None)
    policy = FactsPolicy()
    order: list[str] = []

    class Recorded(FactsPolicy):
        def decide(self, *args: Any, **options: Any) -> list[Decision]:
            order.append("policy")
            return policy.decide(*args, **options)

    def elsewhere(function: Callable[..., Any], /, *args: Any) -> Later[Any]:
        order.append("measures")
        return here(function, *args)  # a worker's value is the same (tests/simulation)

    model, summary = measured(Recorded(), values, offload=elsewhere)
    expected_model, expected = measured(FactsPolicy(), values)  # here: beside the query
    assert order[:2] == ["measures", "policy"]
    assert order.count("measures") == (2 if poisoned else 1)  # again for the allowed ones
    np.testing.assert_array_equal(model, expected_model)
    assert summary == expected


# --- what a fit task asks of its client ------------------------------------------------------


def fit_extras(coordinator: Coordinator, config: dict[str, Any]) -> dict[str, Any]:
    actions = coordinator.handle(StartRound(1, Phase.FIT, 10.0, CANDIDATES, config))
    extras = {frozenset(a.config.extras.items()) for a in actions if isinstance(a, SendFitTask)}
    [only] = extras
    return dict(only)


def test_the_upload_codec_and_the_dp_settings_are_the_coordinators_never_the_apps() -> None:
    """A server app's round config naming a codec or DP noise is overridden, not obeyed."""
    app = {"upload_codec": "topk:1.0", LOCAL_NOISE_STD: 0.0, "app_key": 1}
    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=5, deadline_s=100.0, compression=Compression("int8")
        ),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE)]),
        seed=7,
        privacy=DpCoordinator(
            DpSettings("central", 1.0, 0.5, clients_per_round=5, min_clients=4),
            NoiseSource.secure(),
        ),
    )
    assert fit_extras(coordinator, app) == {
        "upload_codec": "int8",
        CLIP_NORM: 0.5,
        "app_key": 1,
    }
    plain = make()  # no codec asked: none sent, whatever the app says
    assert fit_extras(plain, app) == {LOCAL_NOISE_STD: 0.0, "app_key": 1}
