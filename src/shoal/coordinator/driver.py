"""The live shell: drives the sans-IO coordinator with a real clock, for networked clients.

The simulator plays rounds in virtual time; this driver plays them as clients
check in over a transport. Clients pull work (``check_in`` answers a task or
"retry after N seconds", the seed's pace steering) and push results
(``submit_update``); deadlines are timers on the asyncio loop. The transport
(gRPC, or an in-process call in tests) only turns requests into these calls.

A new global model is persisted (``persist``) before any client is offered
work on it: a crash loses at most the round in progress, never a commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shoal.client.api import EvaluateConfig, FitConfig
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.events import (
    Action,
    ClientFailed,
    CommitVersion,
    DeadlineReached,
    EvaluationReceived,
    Event,
    FinishRun,
    Phase,
    RejectReason,
    RejectSubmission,
    RoundClosed,
    RoundSummary,
    ScheduleDeadline,
    SendEvaluateTask,
    SendFitTask,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.state import RoundState
from shoal.core.parameters import Parameters

log = logging.getLogger("shoal.coordinator")

Persist = Callable[[CommitVersion], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class TaskOffer:
    """Work for one client: what to do, on which model, and by when."""

    round: int
    phase: Phase
    config: FitConfig | EvaluateConfig
    model_sha256: str
    deadline_in_s: float


@dataclass(frozen=True, slots=True)
class RetryLater:
    """No work now: check in again after ``seconds``."""

    seconds: float
    reason: str


@dataclass(frozen=True, slots=True)
class DriverSettings:
    """How the live driver paces rounds."""

    rounds: int
    first_round: int = 1
    evaluate_every: int = 0
    retry_after_s: float = 5.0


class RoundDriver:
    """Runs rounds ``first_round..rounds`` of ``coordinator`` on the running asyncio loop."""

    def __init__(
        self,
        coordinator: Coordinator,
        settings: DriverSettings,
        *,
        candidates: Callable[[], Sequence[str]],
        persist: Persist,
        on_round: Callable[[RoundSummary], None] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.settings = settings
        self._candidates = candidates
        self._persist = persist
        self._on_round = on_round
        self._offers: dict[str, TaskOffer] = {}
        self._deadline_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[RoundSummary] | None = None
        self._commit: CommitVersion | None = None
        self._arrivals = asyncio.Event()
        self._sha_of: tuple[Parameters, str] | None = None

    # --- what the transport calls ------------------------------------------------------

    def check_in(self, client_id: str) -> TaskOffer | RetryLater:
        """A client asks for work: its task in the current round, or when to come back."""
        self._arrivals.set()
        offer = self._offers.get(client_id)
        if offer is None:
            return RetryLater(self.settings.retry_after_s, "no task for this client now")
        remaining = max(0.0, (self._deadline_at or 0.0) - self._now())
        return TaskOffer(offer.round, offer.phase, offer.config, offer.model_sha256, remaining)

    def submit_update(
        self,
        client_id: str,
        round_number: int,
        update: np.ndarray,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> RejectSubmission | None:
        """A client's training result; returns the rejection, or None if it counted."""
        event = UpdateReceived(client_id, round_number, self._now(), update, num_examples, metrics)
        return self._submit(client_id, event)

    def submit_evaluation(
        self,
        client_id: str,
        round_number: int,
        loss: float,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> RejectSubmission | None:
        """A client's evaluation result; returns the rejection, or None if it counted."""
        event = EvaluationReceived(
            client_id, round_number, self._now(), loss, num_examples, metrics
        )
        return self._submit(client_id, event)

    def report_failure(self, client_id: str, round_number: int, reason: str) -> None:
        """A client gave up on its task (it raised, or ran out of battery)."""
        self._offers.pop(client_id, None)
        if self.coordinator.state is not RoundState.FINISHED:
            self._apply(ClientFailed(client_id, round_number, self._now(), reason))

    # --- the round loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Play every round; returns when the last one has closed and been persisted."""
        for round_number in range(self.settings.first_round, self.settings.rounds + 1):
            await self._play(round_number, Phase.FIT)
            every = self.settings.evaluate_every
            if every and round_number % every == 0:
                await self._play(round_number, Phase.EVALUATE)
        self._apply(FinishRun())

    async def _play(self, round_number: int, phase: Phase) -> RoundSummary:
        needed = self.coordinator.settings.quorum_count(phase)
        candidates = await self._enough_candidates(needed)
        self._closed = asyncio.get_running_loop().create_future()
        self._commit = None
        self._apply(StartRound(round_number, phase, self._now(), tuple(candidates)))
        summary = await self._closed
        if self._commit is not None:
            await self._persist(self._commit)  # before anyone is offered the new model
        if self._on_round is not None:
            self._on_round(summary)
        return summary

    async def _enough_candidates(self, needed: int) -> Sequence[str]:
        """Wait, without polling on a fixed beat, until ``needed`` clients are eligible."""
        while True:
            candidates = self._candidates()
            if len(candidates) >= needed:
                return candidates
            self._arrivals.clear()
            try:
                await asyncio.wait_for(self._arrivals.wait(), timeout=self.settings.retry_after_s)
            except TimeoutError:
                continue  # eligibility can also change with time (a client's last check-in ages)

    # --- actions -----------------------------------------------------------------------------

    def _submit(
        self, client_id: str, event: UpdateReceived | EvaluationReceived
    ) -> RejectSubmission | None:
        if self.coordinator.state is RoundState.FINISHED:
            return RejectSubmission(
                client_id, event.round, RejectReason.LATE, "the job has finished"
            )
        actions = self._apply(event)
        self._offers.pop(client_id, None)
        return next((a for a in actions if isinstance(a, RejectSubmission)), None)

    def _apply(self, event: Event) -> list[Action]:
        actions = self.coordinator.handle(event)
        for action in actions:
            self._carry_out(action)
        return actions

    def _carry_out(self, action: Action) -> None:
        match action:
            case SendFitTask() | SendEvaluateTask():
                phase = Phase.FIT if isinstance(action, SendFitTask) else Phase.EVALUATE
                sha = self.model_sha256()
                self._offers[action.client_id] = TaskOffer(
                    action.round, phase, action.config, sha, 0.0
                )
            case ScheduleDeadline():
                loop = asyncio.get_running_loop()
                self._deadline_at = action.at
                self._timer = loop.call_at(action.at, self._deadline, action.round)
            case CommitVersion():
                self._commit = action
            case RoundClosed():
                self._offers.clear()
                if self._timer is not None:
                    self._timer.cancel()
                if self._closed is not None and not self._closed.done():
                    self._closed.set_result(action.summary)
            case RejectSubmission():
                log.info("rejected %s: %s", action.client_id, action.reason.value)

    def model_sha256(self) -> str:
        """The sha256 of the current global model, hashed once per model, not per request."""
        parameters = self.coordinator.parameters
        if self._sha_of is None or self._sha_of[0] is not parameters:
            self._sha_of = (parameters, parameters.sha256())
        return self._sha_of[1]

    def _deadline(self, round_number: int) -> None:
        self._apply(DeadlineReached(round_number, self._now()))

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()
