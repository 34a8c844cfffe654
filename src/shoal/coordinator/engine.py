"""The coordinator's round engine: a sans-IO state machine over rounds.

``Coordinator.handle(event)`` takes one event and returns the actions the
shell must carry out. It never reads a clock, sleeps or touches a socket:
the simulator and the network service drive the very same object.

>>> actions = coordinator.handle(StartRound(round=1, phase=Phase.FIT, now=0.0, candidates=ids))
>>> tasks = [a for a in actions if isinstance(a, SendFitTask)]
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.aggregation.divergence import DivergenceReport, DivergenceRule
from shoal.aggregation.drift import DriftReport, DriftRule
from shoal.aggregation.strategy import Strategy
from shoal.client.api import EvaluateConfig, FitConfig
from shoal.coordinator.app import MetricsAggregation, split_round_config
from shoal.coordinator.events import (
    Action,
    AggregateDecrypted,
    ClientFailed,
    CommitVersion,
    DeadlineReached,
    EvaluationReceived,
    Event,
    FinishRun,
    RoundClosed,
    RoundSummary,
    ScheduleDeadline,
    SecureMessageReceived,
    SecureRoundReport,
    SendEvaluateTask,
    SendFitTask,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.fallback import after_drop
from shoal.coordinator.homomorphic import CkksRound
from shoal.coordinator.policy import (
    Submission,
    UpdatePolicy,
    relative_norms,
    sealed_submission,
)
from shoal.coordinator.round_summary import (
    Counted,
    counted_updates,
    round_measures,
    summarize,
)
from shoal.coordinator.rounds import (
    ClusterBooks,
    FleetBooks,
    PendingUpdate,
    RoundBooks,
    RoundSettings,
    add_metrics,
)
from shoal.coordinator.secure import (
    SecureSettings,
    check_secure_strategy,
    open_secure_round,
)
from shoal.coordinator.selection import CohortSampler, SeededSampler, client_seed, cohort_size
from shoal.coordinator.split import SplitRule, single_layout
from shoal.coordinator.state import RoundState, Step, Trigger, next_state
from shoal.coordinator.validation import cluster_problem, count_problem, update_problem
from shoal.core.clusters import CLUSTER_METRIC, chosen_cluster
from shoal.core.compression import EXTRAS_KEY as COMPRESSION_KEY
from shoal.core.errors import (
    IllegalTransition,
    ProtocolError,
    SecurityError,
    StrategyError,
)
from shoal.core.later import Later, Offload, here
from shoal.core.parameters import (
    Parameters,
    Vector,
    all_finite,
    statistics_averaged,
    untrained_zeroed,
)
from shoal.core.transforms import TransformState
from shoal.governance.policy import Decision
from shoal.privacy.coordinator import (
    DP_TASK_KEYS,
    UNCLIPPED,
    DpCoordinator,
    check_private_strategy,
)
from shoal.secure.messages import StaleMessage
from shoal.secure.server import Aborted, SumReady
from shoal.tasks import Phase, RejectReason, RejectSubmission, split_train_time

log = logging.getLogger("shoal.coordinator")

MAX_ROUND_METRIC_NAMES = 256
"""The most metric names a round books from its clients' results, all together. Each name
is a field of the round's row, a metric of its MLflow step and a key of the version's stored
metrics; a result carries at most 64 (the wire's ``MAX_METRICS``), so a cohort of 1,000
clients naming their own would make a row of 64,000. Past it a result's new names are left
out and the result still counts: refusing it would let a few clients that name metrics
first have every other client's result refused."""
ALWAYS_BOOKED = frozenset({"loss", "accuracy", CLUSTER_METRIC})
"""The names the round itself reads, booked past :data:`MAX_ROUND_METRIC_NAMES` too."""


class Guess:
    """What a round's commit computes from its counted updates: the aggregate (the model's
    step before the server optimizer), the updates stacked once for both measures, their
    divergence and drift. Made at the commit, or beforehand while the policy decides
    (:meth:`Coordinator._guess`)."""

    __slots__ = ("counted", "delta", "divergence", "drift")

    def __init__(self) -> None:
        self.delta: Vector | None = None
        self.counted: Counted | None = None
        self.divergence: Later[DivergenceReport] | None = None
        self.drift: Later[DriftReport] | None = None

    def measure(self, engine: Coordinator, current: RoundBooks, delta: Vector) -> None:
        """The divergence and drift of the round's counted updates against ``delta``: where
        the shell lends an idle process (``engine.offload``), made there meanwhile."""
        if current.counted and (engine.divergence is not None or engine.drift is not None):
            self.counted = counted_updates(current)  # a copy of the round's updates
        self.divergence, self.drift = round_measures(
            current,
            delta,
            divergence=engine.divergence,
            drift=engine.drift,
            seed=engine.seed,
            counted=self.counted,
            offload=engine.offload,
        )
        self.delta = delta


def failure_reason(reason: str) -> str:
    """A client's failure reason as one line of at most 200 characters (its last line)."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "no reason given"
    return line if len(line) <= 200 else line[:197] + "..."


def metric_names_left_out(
    metrics: Mapping[str, Any], booked: Mapping[str, Any], *, limit: int = MAX_ROUND_METRIC_NAMES
) -> list[str]:
    """The names of ``metrics`` new to a round that has ``booked`` some, past the ``limit`` of
    names it books (those of :data:`ALWAYS_BOOKED` are never left out, and take no room).

    >>> metric_names_left_out({"loss": 1.0, "f1": 0.5, "auc": 0.7}, {"x": 1.0}, limit=2)
    ['auc']
    """
    new = [name for name in metrics if name not in booked and name not in ALWAYS_BOOKED]
    room = max(limit - len(booked.keys() - ALWAYS_BOOKED), 0)
    return new[room:]


def _failed(current: RoundBooks, client_id: str, reason: str) -> None:
    """A cohort member's result will not count, for ``reason`` (a ``drops_by_reason`` key)."""
    current.failed.add(client_id)
    if current.fleet is not None:
        current.fleet.drops[reason] += 1


class Coordinator:
    """Runs rounds over a global model with a strategy; see the module docstring."""

    def __init__(
        self,
        *,
        settings: RoundSettings,
        strategy: Strategy,
        parameters: Parameters,
        seed: int,
        optimizer_state: TransformState | None = None,
        secure: SecureSettings | None = None,
        privacy: DpCoordinator | None = None,
        metrics_aggregation: Mapping[Phase, MetricsAggregation] | None = None,
        sampler: CohortSampler | None = None,
        policy: UpdatePolicy | None = None,
        divergence: DivergenceRule | None = None,
        drift: DriftRule | None = None,
        telemetry: bool = True,
        split: SplitRule | None = None,
    ) -> None:
        if secure is not None:
            check_secure_strategy(strategy)
        if privacy is not None:
            check_private_strategy(strategy)
        self.settings = settings
        self.secure = secure
        self.privacy = privacy
        self.policy = policy  # None: every well-formed update counts (policy.enabled = false)
        self.divergence = divergence  # None: no per-client divergence (divergence.enabled = false)
        self.drift = drift  # None: no drift projection (drift.enabled = false)
        self.telemetry = telemetry  # False: no per-client timings ([telemetry] enabled = false)
        # where the divergence and drift are measured: here, at once, unless the shell lends
        # a process the round leaves idle (a simulation's pool worker)
        self.offload: Offload = here
        # under [clustering] start = "flagged" the model's layout picks the strategy: ``strategy``
        # for one model, per cluster once the model split (see shoal.coordinator.split)
        self.split = split
        self.base_strategy = strategy
        self.strategy = strategy if split is None else split.strategy_for(strategy, parameters)
        self.parameters = parameters
        self.seed = seed
        self.sampler = SeededSampler(seed) if sampler is None else sampler
        self.optimizer_state = (
            strategy.server_optimizer.init(parameters.vector)
            if optimizer_state is None
            else optimizer_state
        )
        self.metrics_aggregation = dict(metrics_aggregation or {})
        self.state = RoundState.IDLE
        self.rejections: Counter[str] = Counter()
        self.last_round: int | None = None
        self._round: RoundBooks | None = None
        self._names_full: tuple[int, Phase] | None = None  # the last round that left names out

    # --- the one entry point ---------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; returns the actions for the shell, in order."""
        self._move(type(event))
        actions = self._apply(event)
        fleet = None if self._round is None else self._round.fleet
        if fleet is not None and not isinstance(event, FinishRun):  # when each task left
            asked = [a.client_id for a in actions if isinstance(a, SendFitTask | SendEvaluateTask)]
            fleet.asked(asked, event.now)
        return actions

    def _apply(self, event: Event) -> list[Action]:
        match event:
            case StartRound():
                return self._start(event)
            case UpdateReceived():
                return self._receive_update(event)
            case EvaluationReceived():
                return self._receive_evaluation(event)
            case SecureMessageReceived():
                return self._receive_secure(event)
            case AggregateDecrypted():
                return self._decrypted(event)
            case ClientFailed():
                return self._fail(event)
            case DeadlineReached():
                return self._deadline(event)
            case FinishRun():
                return []

    @property
    def splitting(self) -> bool:
        """Whether a flagged round would split the model (one model under a split rule: the
        strategy follows the layout, so one model is the unclustered strategy)."""
        return self.split is not None and self.strategy.clusters == 1

    def restore(
        self, parameters: Parameters, optimizer_state: TransformState | None = None
    ) -> None:
        """Replace the global model between rounds (resume, rollback). Under a split rule the
        model may be one model or a stack of them (a rollback across the split): the strategy
        follows its layout."""
        if self.state is not RoundState.IDLE:
            raise IllegalTransition(
                f"cannot restore a model while the coordinator is {self.state.value}"
            )
        if parameters.layout != self.parameters.layout:
            if self.split is None or single_layout(parameters) != single_layout(self.parameters):
                raise StrategyError("the restored model's layout differs from the running one")
            self.strategy = self.split.strategy_for(self.base_strategy, parameters)
        self.parameters = parameters
        self.optimizer_state = (
            self.strategy.server_optimizer.init(parameters.vector)
            if optimizer_state is None
            else optimizer_state
        )

    # --- round start ---------------------------------------------------------------------

    def _move(self, trigger: Trigger) -> None:
        self.state = next_state(self.state, trigger)

    def _start(self, event: StartRound) -> list[Action]:
        phase, settings = event.phase, self.settings
        size = cohort_size(target=settings.target(phase), over_selection=settings.over_selection)
        candidates = event.candidates
        if phase is Phase.FIT and self.secure is not None:  # SecAgg+: those who can sign
            candidates = self.secure.eligible(candidates, event.identities)
        sample = self.sampler.draw(
            candidates,
            round_number=event.round,
            phase=phase,
            size=size,
            target=settings.target(phase),
        )
        cohort = sample.members
        self.last_round = event.round
        self._round = RoundBooks(
            number=event.round,
            phase=phase,
            started_at=event.now,
            cohort=frozenset(cohort),
            target=sample.target,
            config=event.config,
            denominator=sample.denominator,
            initial=len(cohort),
            candidates=candidates,
            fleet=FleetBooks() if self.telemetry else None,
        )
        if len(cohort) < settings.quorum_count(phase):
            self._move(Step.TOO_FEW_CANDIDATES)
            reason = (
                f"{len(cohort)} of {len(event.candidates)} eligible clients in the cohort, "
                f"the quorum needs {settings.quorum_count(phase)}"
            )
            return [RoundClosed(self._summary(event.now, committed=False, abort_reason=reason))]
        self._move(Step.COHORT_SELECTED)
        if phase is Phase.FIT and self.secure is not None:
            return self._start_secure(event, cohort)
        if phase is Phase.FIT:
            self._round.aggregation = self.strategy.aggregator.init(
                num_parameters=len(self.parameters)
            )
        actions: list[Action] = [self._task(client_id, event.round, phase) for client_id in cohort]
        self._move(Step.TASKS_SENT)
        self._round.deadline_at = event.now + settings.deadline_s
        actions.append(ScheduleDeadline(round=event.round, at=self._round.deadline_at))
        return actions

    def _start_secure(self, event: StartRound, cohort: Sequence[str]) -> list[Action]:
        current, settings = self._require_round(), self.settings
        assert self.secure is not None
        current.secure = open_secure_round(
            self.secure,
            round_number=event.round,
            cohort=cohort,
            vector_length=len(self.parameters),
            target=current.target,
            quorum=settings.quorum_count(Phase.FIT),
            deadline_s=settings.deadline_s,
            identities={c: event.identities[c] for c in cohort if c in event.identities},
        )
        actions = current.secure.start(event.now, self._fit_task)
        self._move(Step.TASKS_SENT)
        return actions

    def _task(self, client_id: str, round_number: int, phase: Phase) -> Action:
        if phase is Phase.EVALUATE:
            settings, extras = split_round_config(self._require_round().config)
            config = EvaluateConfig(
                round=round_number, batch_size=settings.get("batch_size", 0), extras=extras
            )
            return SendEvaluateTask(client_id, round_number, self.parameters, config)
        return self._fit_task(client_id)

    def _fit_task(self, client_id: str) -> SendFitTask:
        current, settings = self._require_round(), self.settings
        round_number = current.number
        chosen, extras = split_round_config(current.config)
        if self.privacy is not None:  # the DP settings are the coordinator's, never the app's
            extras = {key: value for key, value in extras.items() if key not in DP_TASK_KEYS}
            extras = {**extras, **self.privacy.fit_extras()}
        extras.pop(COMPRESSION_KEY, None)  # and so is the codec (a secure round sends none)
        if settings.compression.enabled and current.secure is None:
            extras = {**extras, COMPRESSION_KEY: settings.compression.spec}
        config = FitConfig(
            round=round_number,
            epochs=chosen.get("epochs", settings.epochs),
            batch_size=chosen.get("batch_size", settings.batch_size),
            learning_rate=chosen.get("learning_rate", settings.learning_rate),
            proximal_mu=chosen.get("proximal_mu", self.strategy.proximal_mu),
            seed=client_seed(seed=self.seed, round_number=round_number, client_id=client_id),
            extras=extras,
        )
        return SendFitTask(client_id, round_number, self.parameters, config)

    # --- collecting --------------------------------------------------------------------

    def _screen(
        self, client_id: str, round_number: int, phase: Phase | None, *, once: bool = True
    ) -> RejectSubmission | None:
        """Why a submission cannot count in the current round, or None if it can.

        ``phase`` None fits either phase (a failure report). ``once`` refuses a
        second answer; a secure round takes several messages per client.
        """
        current = self._round
        if self.state is not RoundState.COLLECTING or current is None:
            return self._reject(
                client_id, round_number, RejectReason.LATE, "no round is collecting"
            )
        if round_number != current.number:
            reason = (
                RejectReason.LATE if round_number < current.number else RejectReason.WRONG_ROUND
            )
            return self._reject(
                client_id, round_number, reason, f"the current round is {current.number}"
            )
        if phase is not None and phase is not current.phase:
            return self._reject(
                client_id, round_number, RejectReason.WRONG_PHASE, f"round is {current.phase.value}"
            )
        if client_id not in current.cohort:
            return self._reject(
                client_id, round_number, RejectReason.NOT_SELECTED, "client is not in the cohort"
            )
        if once and current.answered(client_id):
            return self._reject(
                client_id, round_number, RejectReason.DUPLICATE, "client already answered"
            )
        return None

    def _reject(
        self, client_id: str, round_number: int, reason: RejectReason, detail: str
    ) -> RejectSubmission:
        self.rejections[reason.value] += 1
        if self._round is not None and self.state is RoundState.COLLECTING:
            self._round.rejected[reason.value] += 1
        # an invalid update is a client's bug its operator must see; late or duplicate is routine
        level = logging.WARNING if reason is RejectReason.INVALID_UPDATE else logging.INFO
        log.log(
            level,
            "rejected %s from %s in round %d: %s",
            reason.value,
            client_id,
            round_number,
            detail,
        )
        return RejectSubmission(client_id, round_number, reason, detail)

    def screen_upload(
        self, client_id: str, round_number: int, *, secure: bool = False
    ) -> RejectSubmission | None:
        """The rejection a training result from ``client_id`` for ``round_number`` gets now,
        whatever it holds (counted as any rejection is), or None: a shell asks this before it
        takes a large upload in, and the result is screened again when it arrives.
        ``secure``: a secure round's message (several per client), not a plaintext update."""
        rejection = self._screen(client_id, round_number, Phase.FIT, once=not secure)
        if rejection is not None or secure == (self._require_round().secure is not None):
            return rejection
        if secure:
            detail = "this round does not aggregate securely"
            return self._reject(client_id, round_number, RejectReason.WRONG_PHASE, detail)
        detail = "this round aggregates securely: a plaintext update is refused"
        return self._reject(client_id, round_number, RejectReason.INVALID_UPDATE, detail)

    def _receive_update(self, event: UpdateReceived) -> list[Action]:
        rejection = self.screen_upload(event.client_id, event.round)
        if rejection is not None:
            return [rejection]
        current = self._require_round()
        if event.upload_bytes is not None:
            current.upload_bytes = (current.upload_bytes or 0) + event.upload_bytes
        metrics = self._timed(current, event.client_id, event.now, event.metrics)
        problem = update_problem(
            event.update, num_examples=event.num_examples, size=len(self.parameters)
        )
        if problem is None and self.strategy.clusters > 1:
            problem = cluster_problem(event.update, event.metrics, clusters=self.strategy.clusters)
        check = self.strategy.local_check
        if problem is None and check is not None:
            problem = check(self.parameters.vector + event.update)
        if problem is not None:
            _failed(current, event.client_id, "rejected:invalid_update")
            current.failures[failure_reason(f"invalid update: {problem}")] += 1
            rejection = self._reject(
                event.client_id, event.round, RejectReason.INVALID_UPDATE, problem
            )
            return [rejection, *self._maybe_close(event.now)]
        if self.policy is not None:  # decided with the round's others when it aggregates
            norm = float(np.linalg.norm(event.update.astype(np.float64, copy=False)))
            current.pending[event.client_id] = PendingUpdate(
                event.update, event.num_examples, metrics, norm, event.authentication
            )
            return self._maybe_close(event.now)
        self._count(current, event.client_id, event.update, event.num_examples, metrics)
        return self._maybe_close(event.now)

    def _timed(
        self, current: RoundBooks, client_id: str, now: float, metrics: Mapping[str, float]
    ) -> Mapping[str, float]:
        """A result's metrics without its reserved training time, which the fleet books take
        with the result's arrival."""
        metrics, train_s = split_train_time(metrics)
        if current.fleet is not None:
            current.fleet.answered(client_id, now, train_s)
        return metrics

    def _count(
        self,
        current: RoundBooks,
        client_id: str,
        update: Vector,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> None:
        """An update that counts: into the aggregate, and into the round's books."""
        self._accumulate(current, client_id, update, num_examples, metrics)
        self._book(current, client_id, num_examples, metrics)

    def _accumulate(
        self,
        current: RoundBooks,
        client_id: str,
        update: Vector,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> None:
        """An update into the round's aggregate, and among the updates measured at the commit."""
        weight = float(num_examples)
        if self.privacy is not None:  # user-level DP: clipped updates, every client weighs one
            update, within = self.privacy.admit(update, reported=metrics.get(UNCLIPPED))
            weight, current.unclipped = 1.0, current.unclipped + within
        current.aggregation = self.strategy.aggregator.accumulate(
            current.aggregation, update, weight=weight
        )
        if self.divergence is not None or self.drift is not None:  # measured at the commit
            current.counted.append((client_id, update))
            if self.splitting:  # a split averages each group with the round's weights
                current.counted_weights.append(weight)

    # --- the policy ----------------------------------------------------------------------

    def _decide_pending(self, current: RoundBooks) -> Guess | None:
        """The policy's decisions on the round's updates, in one query; the allowed count.

        While the policy decides (its query leaves this thread free), the round's aggregate
        and what the commit measures of its updates are computed as though every update were
        allowed, the usual case (:meth:`_guess`); before it decides, where the measures go to
        a process the shell lent (:attr:`offload`). The guess, returned, is the round when
        they all are; a denial throws it away, and the allowed updates are counted alone."""
        assert self.policy is not None
        pending = list(current.pending.items())
        current.pending.clear()
        relative = relative_norms([entry.l2_norm for _, entry in pending])
        submissions = [
            Submission(
                client_id,
                entry.authentication,
                l2_norm=entry.l2_norm,
                relative_l2_norm=ratio,
                num_examples=entry.num_examples,
            )
            for (client_id, entry), ratio in zip(pending, relative, strict=True)
        ]
        guess = Guess() if self._may_guess(current) else None
        meanwhile = None if guess is None else lambda: self._guess(current, pending, guess)
        if meanwhile is not None and self.offload is not here:
            # the measures go to an idle process: started before the policy's work, they are
            # done by the time the round needs them, and little is left here to do beside it
            meanwhile()
            meanwhile = None
        decisions = self.policy.decide(current.number, submissions, meanwhile=meanwhile)
        allowed = all(decision.allowed for decision in decisions)
        if guess is not None and guess.delta is not None and allowed:  # the guess was the round
            for client_id, entry in pending:
                self._book(current, client_id, entry.num_examples, entry.metrics)
            return guess
        if guess is not None:  # thrown away: the books as they were before it
            current.aggregation = self.strategy.aggregator.init(num_parameters=len(self.parameters))
            current.counted, current.counted_weights = [], []
        for (client_id, entry), decision in zip(pending, decisions, strict=True):
            if decision.allowed:
                self._count(current, client_id, entry.update, entry.num_examples, entry.metrics)
            else:
                self._deny(current, decision)
        return None

    def _may_guess(self, current: RoundBooks) -> bool:
        """Whether the round's aggregate may be computed while the policy decides: a plaintext
        fit round that counted nothing yet, without DP (whose clipping books and noise come
        with the counted updates alone)."""
        return (
            self.privacy is None
            and current.phase is Phase.FIT
            and current.secure is None
            and not current.reported
        )

    def _guess(
        self, current: RoundBooks, pending: Sequence[tuple[str, PendingUpdate]], guess: Guess
    ) -> None:
        """The round's aggregate, divergence and drift as though every pending update were
        allowed (into ``guess``). A guess never fails the round: it also holds the updates the
        policy will deny, which the round's own path never sees, so any error leaves it empty,
        and the round works on the allowed updates alone (meeting any failure of theirs there,
        and saying so)."""
        try:
            for client_id, entry in pending:
                self._accumulate(
                    current, client_id, entry.update, entry.num_examples, entry.metrics
                )
            delta = self.strategy.aggregator.finalize(current.aggregation)
            guess.measure(self, current, delta)
        except Exception as exc:  # the round's own path decides what an error means
            log.debug("round %d: the work beside the policy failed: %s", current.number, exc)
            guess.delta = None

    def _deny(self, current: RoundBooks, decision: Decision) -> None:
        """A denied update: its client failed the round, counted under each reason's code."""
        _failed(current, decision.client_id, "rejected:policy")
        codes = sorted({reason.code for reason in decision.reasons})
        current.policy_denied.update(codes)
        current.failures[failure_reason(f"policy denied: {', '.join(codes)}")] += 1

    def _screen_sealed(
        self, current: RoundBooks, event: SecureMessageReceived
    ) -> list[Action] | None:
        """The policy on a secure round's client at its first message; the actions of a denial."""
        if self.policy is None or event.client_id in current.policy_checked:
            return None
        current.policy_checked.add(event.client_id)
        current.policy_decisions += 1
        assert self.secure is not None
        sealed = sealed_submission(
            event.client_id, event.authentication, secure=self.secure, size=len(self.parameters)
        )
        (decision,) = self.policy.decide(current.number, [sealed])
        if decision.allowed:
            return None
        assert current.secure is not None
        self._deny(current, decision)
        detail = "policy denied: " + "; ".join(str(reason) for reason in decision.reasons)
        rejection = RejectSubmission(
            event.client_id, event.round, RejectReason.INVALID_UPDATE, failure_reason(detail)
        )
        actions, outcome = current.secure.dropped(event.client_id, event.now, self._fit_task)
        return [rejection, *actions, *self._secure_outcome(current, outcome, event.now)]

    def _receive_evaluation(self, event: EvaluationReceived) -> list[Action]:
        rejection = self._screen(event.client_id, event.round, Phase.EVALUATE)
        if rejection is not None:
            return [rejection]
        current = self._require_round()
        metrics = self._timed(current, event.client_id, event.now, event.metrics)
        problem = (
            "loss is not finite"
            if not math.isfinite(event.loss)
            else count_problem(event.num_examples, settings=self.settings)
        )
        if problem is not None:
            _failed(current, event.client_id, "rejected:invalid_update")
            current.failures[failure_reason(f"invalid evaluation: {problem}")] += 1
            rejection = self._reject(
                event.client_id, event.round, RejectReason.INVALID_UPDATE, problem
            )
            return [rejection, *self._maybe_close(event.now)]
        accuracy = metrics.get("accuracy")
        # a NaN or infinite accuracy would be its device class's, and the fairness gap's
        if (
            current.fleet is not None
            and isinstance(accuracy, int | float)
            and math.isfinite(accuracy)
        ):
            current.fleet.evaluations[event.client_id] = (event.num_examples, float(accuracy))
        metrics = {**metrics, "loss": event.loss}
        self._book(current, event.client_id, event.num_examples, metrics)
        return self._maybe_close(event.now)

    def _book(self, current: RoundBooks, client_id: str, num_examples: int, metrics: Any) -> None:
        current.reported.add(client_id)
        current.num_examples += num_examples
        metrics = self._bounded(current, metrics)
        if current.phase in self.metrics_aggregation:
            current.client_metrics.append((num_examples, dict(metrics)))
        if self.strategy.clusters > 1:  # a clustered client's metrics count for its cluster
            metrics = dict(metrics)
            cluster = chosen_cluster(metrics, clusters=self.strategy.clusters)
            metrics.pop(CLUSTER_METRIC, None)
            if cluster is not None:
                current.clusters.setdefault(cluster, ClusterBooks()).add(num_examples, metrics)
        add_metrics(current.metric_sums, current.metric_weights, num_examples, metrics)

    def _bounded(self, current: RoundBooks, metrics: Mapping[str, Any]) -> Mapping[str, Any]:
        """``metrics`` without the new names past :data:`MAX_ROUND_METRIC_NAMES` (the round's
        names are its sums'); the first result of a round to lose some is logged."""
        left_out = metric_names_left_out(metrics, current.metric_sums)
        if not left_out:
            return metrics
        if self._names_full != (current.number, current.phase):
            self._names_full = (current.number, current.phase)
            log.warning(
                "round %d keeps %d metric names of its clients: the new ones of its later "
                "results are left out (%d of this one, such as %r)",
                current.number,
                MAX_ROUND_METRIC_NAMES,
                len(left_out),
                left_out[0][:40],
            )
        dropped = set(left_out)
        return {name: value for name, value in metrics.items() if name not in dropped}

    def _collecting(self, round_number: int) -> RoundBooks | None:
        """The round in progress if it is ``round_number`` and still collecting."""
        current = self._round
        if self.state is not RoundState.COLLECTING or current is None:
            return None
        return current if current.number == round_number else None

    def _fail(self, event: ClientFailed) -> list[Action]:
        """A cohort member gave up; a report about another round, or a second one, is rejected."""
        rejection = self._screen(event.client_id, event.round, phase=None)
        if rejection is not None:
            return [rejection]
        current = self._require_round()
        # the round's summary counts the reasons (the shells print them under the round's line)
        log.info("client %s failed in round %d: %s", event.client_id, event.round, event.reason)
        _failed(current, event.client_id, f"failed:{event.kind}")
        current.failures[failure_reason(event.reason)] += 1
        if current.secure is not None:
            actions, outcome = current.secure.dropped(event.client_id, event.now, self._fit_task)
            if outcome is None:
                actions += self._fallback(current, event.now)
                if self.state is not RoundState.COLLECTING:
                    return actions  # the fallback aborted the round
            return [*actions, *self._secure_outcome(current, outcome, event.now)]
        actions = self._fallback(current, event.now)
        if self.state is not RoundState.COLLECTING:
            return actions  # the fallback aborted the round
        return [*actions, *self._maybe_close(event.now)]

    def _deadline(self, event: DeadlineReached) -> list[Action]:
        current = self._collecting(event.round)
        if current is None:
            return []  # a stale timer of a round already closed
        if current.deadline_at is not None and event.now < current.deadline_at:
            return []  # the timer of a deadline that an extension moved
        if current.secure is not None:
            actions, outcome = current.secure.deadline(event.stage, event.now, self._fit_task)
            return [*actions, *self._secure_outcome(current, outcome, event.now)]
        return self._close(event.now)

    # --- when too much of the cohort drops (see shoal.coordinator.fallback) --------------

    def _fallback(self, current: RoundBooks, now: float) -> list[Action]:
        """Carry out the job's fallback once more than its share of the cohort has dropped."""
        quorum = self.settings.quorum_count(current.phase)
        if current.secure is not None:
            quorum = max(quorum, current.secure.survivors_needed)
        step = after_drop(
            current,
            self.settings.fallback,
            deadline_s=self.settings.deadline_s,
            quorum=quorum,
            private=self.privacy is not None and current.phase is Phase.FIT,
            seed=self.seed,
            now=now,
        )
        if step.abort is not None:
            self._move(Step.ROUND_CLOSED)
            self._move(Step.QUORUM_MISSED)
            return [RoundClosed(self._summary(now, committed=False, abort_reason=step.abort))]
        actions = [
            self._task(client, current.number, current.phase) for client in step.replacements
        ]
        if step.deadline_at is not None:
            actions.append(ScheduleDeadline(round=current.number, at=step.deadline_at))
        return actions

    # --- secure rounds -----------------------------------------------------------------

    def _receive_secure(self, event: SecureMessageReceived) -> list[Action]:
        rejection = self.screen_upload(event.client_id, event.round, secure=True)
        if rejection is not None:
            return [rejection]
        current = self._require_round()
        assert current.secure is not None  # screen_upload refused a message of a plain round
        denied = self._screen_sealed(current, event)
        if denied is not None:
            return denied
        try:
            actions, outcome = current.secure.message(
                event.client_id, event.message, event.now, self._fit_task
            )
        except StaleMessage as exc:
            return [self._reject(event.client_id, event.round, RejectReason.LATE, str(exc))]
        except (ProtocolError, SecurityError) as exc:
            reason = RejectReason.INVALID_UPDATE
            return [self._reject(event.client_id, event.round, reason, str(exc))]
        if current.fleet is not None:  # the first message after its task is its result
            current.fleet.answered(event.client_id, event.now)
        return [*actions, *self._secure_outcome(current, outcome, event.now)]

    def _decrypted(self, event: AggregateDecrypted) -> list[Action]:
        current = self._collecting(event.round)
        if current is None or not isinstance(current.secure, CkksRound):
            return []  # an answer for a round already closed
        return self._secure_outcome(current, current.secure.decrypted(event), event.now)

    def _secure_outcome(
        self, current: RoundBooks, outcome: SumReady | Aborted | None, now: float
    ) -> list[Action]:
        """Close a secure round once its protocol finished or aborted."""
        if outcome is None:
            return []
        assert current.secure is not None
        self._move(Step.ROUND_CLOSED)
        if isinstance(outcome, Aborted):
            current.secure_report = SecureRoundReport(
                current.secure.protocol,
                outcome.dropped,
                recovered=0,
                aborted=True,
                culprits=outcome.culprits,
            )
            self._move(Step.QUORUM_MISSED)
            reason = f"secure aggregation aborted: {outcome.reason}"
            return [RoundClosed(self._summary(now, committed=False, abort_reason=reason))]
        result = outcome.result
        current.secure_report = SecureRoundReport(
            current.secure.protocol,
            result.dropped,
            len(result.recovered),
            aborted=False,
            culprits=result.culprits,
        )
        current.reported = set(result.contributors)
        current.num_examples = result.decoded.num_examples
        loss = result.decoded.mean_loss()
        if loss is not None and self.privacy is None:  # under DP the clients withhold their loss
            current.metric_sums["loss"] = loss * current.num_examples
            current.metric_weights.pop("loss", None)  # the decoded mean: over all examples
        if self.privacy is not None:  # every client weighed one: the decoded sum is the sum
            total = result.decoded.weighted_sum
            return self._aggregate_and_commit(current, now, mean=self._private_mean(total, 0.0))
        return self._aggregate_and_commit(current, now, mean=result.decoded.mean())

    def _require_round(self) -> RoundBooks:
        if self._round is None:
            raise IllegalTransition("no round in progress")
        return self._round

    # --- closing -------------------------------------------------------------------------

    def _maybe_close(self, now: float) -> list[Action]:
        current = self._require_round()
        received = len(current.reported) + len(current.pending)
        if received >= current.target or current.accounted >= len(current.cohort):
            return self._close(now)
        return []

    def _close(self, now: float) -> list[Action]:
        current = self._require_round()
        self._move(Step.ROUND_CLOSED)
        guess = None
        if current.pending:
            current.policy_decisions += len(current.pending)
            guess = self._decide_pending(current)
        quorum = self.settings.quorum_count(current.phase)
        if len(current.reported) < quorum:
            self._move(Step.QUORUM_MISSED)
            reason = f"{len(current.reported)} of {current.target} reported, the quorum is {quorum}"
            return [RoundClosed(self._summary(now, committed=False, abort_reason=reason))]
        if current.phase is Phase.EVALUATE:
            self._move(Step.QUORUM_MET)
            self._move(Step.COMMITTED)
            return [RoundClosed(self._summary(now, committed=True))]
        return self._aggregate_and_commit(current, now, guess=guess)

    def _aggregate_and_commit(
        self,
        current: RoundBooks,
        now: float,
        *,
        mean: Vector | None = None,
        guess: Guess | None = None,
    ) -> list[Action]:
        """Step the model by the aggregate (or by the secure ``mean``, or by the ``guess``
        made while the policy decided) and commit it."""
        try:
            if mean is not None:
                delta = mean
            elif guess is not None and guess.delta is not None:
                delta = guess.delta
            else:
                delta = self.strategy.aggregator.finalize(current.aggregation)
            if self.privacy is not None and mean is None:  # the mean of n updates, times n
                total = delta.astype(np.float64) * len(current.reported)
                delta = self._private_mean(total, float(current.unclipped))
            step, optimizer_state = self.strategy.server_optimizer.update(
                delta, self.optimizer_state, self.parameters.vector
            )
            # running statistics are averaged; DP noise, or a client that ignored the rule,
            # leave counters and masks as they are
            layout = self.parameters.layout
            step = untrained_zeroed(statistics_averaged(step, delta, layout), layout)
            vector = (self.parameters.vector + step).astype(np.float32, copy=False)
            if not all_finite(vector):
                raise StrategyError("the aggregated model holds NaN or infinite values")
        except StrategyError as exc:
            self._move(Step.QUORUM_MISSED)
            log.error("round %d aborted in aggregation: %s", current.number, exc)
            return [RoundClosed(self._summary(now, committed=False, abort_reason=str(exc)))]
        self._move(Step.QUORUM_MET)
        self.parameters = self.parameters.with_vector(vector)
        self.optimizer_state = optimizer_state
        if guess is None:
            guess = Guess()
            guess.measure(self, current, delta)
        counted = guess.counted
        current.divergence, current.drift = guess.divergence, guess.drift
        if self.splitting:
            self._split(current, delta, counted)
        current.counted, current.counted_weights = [], []  # measured: the books let go of them
        summary = self._summary(now, committed=True)
        self._move(Step.COMMITTED)
        return [CommitVersion(current.number, self.parameters, summary), RoundClosed(summary)]

    def _split(self, current: RoundBooks, delta: Vector, counted: Counted | None) -> None:
        """Split the new model into cluster models when the round's drift flagged groups; the
        per-cluster strategy and a fresh server optimizer state (over the stack) from now on."""
        assert self.split is not None
        split = self.split.split(
            self.parameters,
            delta,
            round_number=current.number,
            drift=None if current.drift is None else current.drift.result(),
            counted=counted,
            weights=current.counted_weights,
        )
        if split is None:
            return
        log.info(
            "round %d: the drift flagged distinct groups; the model splits into %d cluster "
            "models (%s clients)",
            current.number,
            split.report.clusters,
            "/".join(str(size) for size in split.report.sizes),
        )
        self.parameters = split.parameters
        self.strategy = self.split.strategy_for(self.base_strategy, split.parameters)
        self.optimizer_state = self.strategy.server_optimizer.init(split.parameters.vector)
        current.split = split.report

    def _private_mean(self, total: npt.NDArray[np.floating], unclipped: float) -> Vector:
        """DP-FedAvg's noised mean; the clip norm it used goes into the round's metrics."""
        assert self.privacy is not None
        current = self._require_round()
        current.metric_sums["dp_clip_norm"] = self.privacy.clip.clip_norm * current.num_examples
        current.metric_weights.pop("dp_clip_norm", None)
        return self.privacy.private_mean(
            total, unclipped=unclipped, denominator=current.denominator
        )

    def _summary(
        self, now: float, *, committed: bool, abort_reason: str | None = None
    ) -> RoundSummary:
        current = self._require_round()
        return summarize(
            current,
            now=now,
            committed=committed,
            abort_reason=abort_reason,
            aggregate=self.metrics_aggregation.get(current.phase),
            deadline_s=self.settings.deadline_s,
        )
