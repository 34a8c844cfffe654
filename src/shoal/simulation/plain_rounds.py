"""Plain fit and evaluation rounds in the simulator, played in virtual time.

The device fleet says when each member's result arrives, or when it drops;
results and drops reach the coordinator in virtual-time order until the
round closes (the deadline always closes it). Local training runs for real,
only for the results the coordinator will actually receive, batched over
the executor's workers. The engine's fallback
(:mod:`shoal.coordinator.fallback`) may ask replacements, which get
attempts of their own from the moment they are asked, or move the deadline.

A round is started (:meth:`PlainRoundPlayer.start`: its tasks' attempts planned, the batch its
first result needs under way) before it is played (:meth:`PlainRoundPlayer.play`), so that
its training can run while the round before commits its records.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.coordinator.events import (
    Action,
    Authentication,
    ClientFailed,
    CommitVersion,
    DeadlineReached,
    EvaluationReceived,
    Event,
    RoundClosed,
    RoundSummary,
    ScheduleDeadline,
    SendEvaluateTask,
    SendFitTask,
    UpdateReceived,
)
from shoal.coordinator.run import Ahead, Run
from shoal.core.errors import RunError
from shoal.simulation.devices import Attempt
from shoal.simulation.dropouts import DROPPED_REASON
from shoal.simulation.executor import Batch, Executor, Job, Outcome
from shoal.tasks import TRAIN_TIME_METRIC, Phase

if TYPE_CHECKING:
    from shoal.simulation.runner import Simulation


@dataclass(slots=True)
class _Delivery:
    """A result (or a drop, or the deadline: no client) on its way to the coordinator,
    ordered by virtual arrival time."""

    at: float
    order: int
    client_id: str
    dropped: bool = False

    def __lt__(self, other: _Delivery) -> bool:
        return (self.at, self.order) < (other.at, other.order)


class PlainRoundPlayer:
    """One plain (not secure) round of a simulation, played in virtual time.

    Results and drops reach the coordinator in virtual-time order until the
    round closes; replacements it asks (a re-selecting fallback) get their
    own attempts from the time they are asked, and an extended deadline
    replaces the old one.
    """

    def __init__(
        self,
        simulation: Simulation,
        lifecycle: Run,
        executor: Executor,
        round_number: int,
        phase: Phase,
    ) -> None:
        self.simulation = simulation
        self.lifecycle = lifecycle
        self.executor = executor
        self.round = round_number
        self.phase = phase
        self.tasks: dict[str, SendFitTask | SendEvaluateTask] = {}
        self.attempts: dict[str, Attempt] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.queue: list[_Delivery] = []
        self.deadline = 0.0
        self.uploads = 0
        self.uploaded_bytes = 0  # a fit round's uploads, each its payload's size
        self.reported_drops = 0
        self._order = itertools.count()
        self._first: Batch | None = None  # the batch started with the round, not yet taken
        self._unenrolled: list[tuple[list[str], float]] = []  # see start()

    def start(self, actions: list[Action], now: float, *, ahead: bool = False) -> None:
        """Carry out the round's first actions and start the batch of training its first
        result needs (``ahead``: while this process commits the round before, whose records
        the cohort's enrolment must follow: it waits for :meth:`play`)."""
        self._carry_out(actions, now, enroll=not ahead)
        jobs = self._needed(None)
        if jobs:
            coordinator = self.simulation.coordinator
            self._first = self.executor.start(coordinator.parameters, jobs, ahead=ahead)

    def play(self, ahead: Ahead | None = None) -> dict[str, Any]:
        """Deliver everything until the round closes; its row (``ahead`` is given to the
        round's close, :meth:`shoal.coordinator.run.Run.close_round`)."""
        commit: CommitVersion | None = None
        coordinator = self.simulation.coordinator
        for names, at in self._unenrolled:  # a round started ahead: after the one before
            self.simulation.enroll_cohort(names, at)
        self._unenrolled.clear()
        while self.queue:
            delivery = heapq.heappop(self.queue)
            if not delivery.client_id:
                actions = coordinator.handle(DeadlineReached(self.round, delivery.at))
            elif delivery.dropped:
                self.reported_drops += 1
                event = ClientFailed(
                    delivery.client_id, self.round, delivery.at, DROPPED_REASON, kind="dropped"
                )
                actions = coordinator.handle(event)
            else:
                if delivery.client_id not in self.outcomes:
                    self._compute(delivery)
                self.uploads += 1
                outcome = self.outcomes[delivery.client_id]
                self.uploaded_bytes += _upload_bytes(outcome, self.simulation.model_bytes)
                attempt = self.attempts[delivery.client_id]
                actions = coordinator.handle(
                    _result_event(outcome, self.round, delivery.at, train_s=attempt.train_s)
                )
            commit = next((a for a in actions if isinstance(a, CommitVersion)), commit)
            closed = next((a.summary for a in actions if isinstance(a, RoundClosed)), None)
            if closed is not None:
                return self._close(closed, commit, ahead)
            self._carry_out(actions, delivery.at)
        raise RunError(f"round {self.round} never closed")  # the deadline always closes it

    def _carry_out(self, actions: Sequence[Action], now: float, *, enroll: bool = True) -> None:
        """Plan the attempts of new tasks and enroll their clients (or keep them for later,
        without ``enroll``); queue a (new) deadline."""
        for action in actions:
            if isinstance(action, ScheduleDeadline):
                self.deadline = action.at
                self._push(action.at, "")
        tasks = [a for a in actions if isinstance(a, SendFitTask | SendEvaluateTask)]
        if tasks:  # the round's first members, or replacements
            names = [task.client_id for task in tasks]
            if enroll:
                self.simulation.enroll_cohort(names, now)
            else:
                self._unenrolled.append((names, now))
        for task in tasks:
            client = task.client_id
            self.tasks[client] = task
            attempt = self.attempts[client] = self.simulation.plan_attempt(task, now, self.deadline)
            if attempt.arrives_at is not None:
                self._push(attempt.arrives_at, client)
            elif attempt.dropped:
                self._push(self.simulation.drop_at(task, now, self.deadline), client, dropped=True)

    def _push(self, at: float, client_id: str, *, dropped: bool = False) -> None:
        heapq.heappush(self.queue, _Delivery(at, next(self._order), client_id, dropped))

    def _compute(self, delivery: _Delivery) -> None:
        """Train the results that will be needed next (by the deadline), as one parallel
        batch: the one started with the round, where it trained them (the first result's,
        unless drops asked replacements that come first), and what it left out."""
        jobs = self._needed(delivery)
        if self._first is not None:
            batch, self._first = self._first, None
            needed = {job.client_id for job in jobs}
            for outcome in batch.result():
                self.simulation.keep_residual(outcome)  # the device trained, whether needed or not
                if outcome.client_id in needed:
                    self.outcomes[outcome.client_id] = outcome
            jobs = [job for job in jobs if job.client_id not in self.outcomes]
            if not jobs:
                return
        for outcome in self.executor.run(self.simulation.coordinator.parameters, jobs):
            self.simulation.keep_residual(outcome)
            self.outcomes[outcome.client_id] = outcome

    def _needed(self, delivery: _Delivery | None) -> list[Job]:
        """The jobs of the results needed next: those arriving by the deadline, first to
        arrive first, as many as the round still needs; ``delivery`` is one taken from the
        queue already."""
        answered = sum(1 for outcome in self.outcomes.values() if outcome.error is None)
        still_needed = max(1, self.simulation.settings.target(self.phase) - answered)
        waiting = sorted(
            d
            for d in ([*self.queue] if delivery is None else [delivery, *self.queue])
            if d.client_id
            and not d.dropped
            and d.client_id not in self.outcomes
            and d.at <= self.deadline
        )
        simulation = self.simulation
        return [
            simulation.job_for(self.tasks[d.client_id], self.attempts[d.client_id])
            for d in waiting[:still_needed]
        ]

    def _close(
        self, closed: RoundSummary, commit: CommitVersion | None, ahead: Ahead | None
    ) -> dict[str, Any]:
        if self._first is not None:  # closed before its first result (drops aborted it)
            self._first.drop()
            self._first = None
        counted = set(closed.participants)
        if self.phase is Phase.FIT:
            self.simulation.record_level.add_all(
                (client, outcome.metrics)
                for client, outcome in self.outcomes.items()
                if client in counted
            )
        fields = self.simulation.shell_fields(
            closed,
            self.attempts,
            self.uploads,
            self.reported_drops,
            model=None if commit is None else commit.parameters,
            uploaded_bytes=self.uploaded_bytes if self.phase is Phase.FIT else None,
        )
        return self.lifecycle.close_round(closed, commit, fields, ahead=ahead)


def _upload_bytes(outcome: Outcome, model_bytes: int) -> int:
    """What a delivered outcome took on the uplink: its payload, or the whole model; a
    failure report, nothing counted."""
    if outcome.error is not None:
        return 0
    return model_bytes if outcome.upload_bytes is None else outcome.upload_bytes


def _result_event(outcome: Outcome, round_number: int, at: float, *, train_s: float) -> Event:
    """The outcome as the coordinator receives it, with the training (or evaluation) time the
    latency model gave it, as a deployed client reports its own (``TRAIN_TIME_METRIC``)."""
    if outcome.error is not None:
        return ClientFailed(outcome.client_id, round_number, at, outcome.error)
    metrics = {**outcome.metrics, TRAIN_TIME_METRIC: train_s}
    if outcome.update is not None:
        return UpdateReceived(
            outcome.client_id,
            round_number,
            at,
            outcome.update,
            outcome.num_examples,
            metrics,
            Authentication.IN_PROCESS,  # the simulator delivers it itself: no wire
        )
    return EvaluationReceived(
        outcome.client_id, round_number, at, outcome.loss, outcome.num_examples, metrics
    )
