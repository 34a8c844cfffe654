"""The live shell: drives the sans-IO coordinator with a real clock, for networked clients.

The simulator plays rounds in virtual time; this driver plays them as clients
check in over a transport. Clients pull work (``check_in`` answers a task or
"retry after N seconds", the seed's pace steering) and push results
(``submit_update``); deadlines are timers on the asyncio loop. The transport
(gRPC, or an in-process call in tests) only turns requests into these calls.

Under secure aggregation (SecAgg+), a fit round is five stages. A key,
consistency or unmask stage is offered as a :class:`SecureOffer` (the
request, no model); the masked-input stage as a fit :class:`TaskOffer` that
also carries its request. Clients answer with ``submit_secure``; each stage
has its own timer, and a client between stages is told to come back soon.
The round starts with the candidates' enrolled identity keys
(``identities``), which SecAgg+ clients sign their keys and the survivor
set with.

Under homomorphic aggregation (CKKS), a fit task carries the encryption
request and each silo answers with its encrypted update (``submit_secure``).
The engine adds the ciphertexts; when it asks for the sum's decryption, the
driver hands the request to ``decrypt`` (the key holder, never this
process) and feeds its answer, or its refusal, back to the engine.

The driver plays the rounds the run layer schedules (``plays``, see
:mod:`shoal.coordinator.run`), each with the run layer's round config, once
the run layer admits the eligible clients ``candidates`` lists (``admit``:
a round waits while too few are eligible or the registry cannot be read,
logging why once per reason; the run layer can also end training there),
and awaits ``on_closed`` with each closed round (and its new model) before it
starts the next: the run layer persists the model before any client is
offered work on it, so a crash loses at most the round in progress. After
the last round every check-in is answered :class:`RunFinished`.

The clock is injected (``DriverSettings.clock``: the event loop's by
default), so that tests can run the driver in virtual time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from shoal.coordinator.engine import Coordinator
from shoal.coordinator.events import (
    Action,
    AggregateDecrypted,
    Authentication,
    ClientFailed,
    CommitVersion,
    DeadlineReached,
    EvaluationReceived,
    Event,
    FinishRun,
    RequestDecryption,
    RoundClosed,
    RoundSummary,
    ScheduleDeadline,
    SecureMessageReceived,
    SendEvaluateTask,
    SendFitTask,
    SendSecureRequest,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.homomorphic import CKKS
from shoal.coordinator.run import Admission
from shoal.coordinator.schedule import Play
from shoal.coordinator.secure import SECAGG_PLUS
from shoal.coordinator.state import RoundState
from shoal.core.errors import ConfigError, RegistryError
from shoal.core.parameters import Parameters
from shoal.secure.messages import Stage
from shoal.secure.serde import SecureReply
from shoal.tasks import (
    CheckInAnswer,
    Offer,
    Phase,
    RejectReason,
    RejectSubmission,
    RetryLater,
    RunFinished,
    SecureOffer,
    TaskOffer,
    offer_stage,
)

log = logging.getLogger("shoal.coordinator")
_FINISHED = "the job has finished"


@dataclass(slots=True)
class Awaited:
    """What a round waiting for clients needs before it lists them again: ``short``
    newcomers, clients it did not list the last time (one it listed adds nothing)."""

    listed: frozenset[str]
    short: int
    newcomers: set[str] = field(default_factory=set)

    def arrived(self, client_id: str) -> bool:
        """Note a check-in; whether the round should list its clients again now."""
        if client_id not in self.listed:
            self.newcomers.add(client_id)
        return len(self.newcomers) >= self.short


OnClosed = Callable[[RoundSummary, CommitVersion | None], Awaitable[None]]
"""Told each closed round and its new model (if any); the next round starts once it returns."""
Decrypt = Callable[[RequestDecryption], Awaitable[npt.NDArray[np.float64]]]
"""Asks the key holder for a homomorphic round's sum; raises with its refusal."""
RoundConfig = Callable[[Play], Mapping[str, Any]]
Admit = Callable[[Play, Sequence[str]], Admission]
"""The run layer's word on a round, given the eligible clients listed (:meth:`Run.admit`)."""
Identities = Callable[[Sequence[str]], Mapping[str, bytes]]
"""The enrolled Ed25519 public keys of the given clients (those that have one)."""
SECURE_STAGE_RETRY_S = 0.25
"""The longest a client of a secure round waits between stages before checking in again."""


class Clock(Protocol):
    """Time and timers: the event loop's, or a test's virtual one."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class DriverSettings:
    """How the live driver paces clients."""

    retry_after_s: float = 5.0
    clock: Clock | None = None  # None: the running event loop


class RoundDriver:
    """Runs rounds ``first_round..rounds`` of ``coordinator`` on the running asyncio loop."""

    def __init__(
        self,
        coordinator: Coordinator,
        settings: DriverSettings,
        *,
        plays: Iterable[Play],
        candidates: Callable[[], Sequence[str]],
        on_closed: OnClosed | None = None,
        round_config: RoundConfig | None = None,
        decrypt: Decrypt | None = None,
        admit: Admit | None = None,
        identities: Identities | None = None,
    ) -> None:
        secure = coordinator.secure
        if secure is not None and secure.protocol not in (SECAGG_PLUS, CKKS):
            raise ConfigError(
                f"secure_aggregation.protocol: networked clients run {SECAGG_PLUS!r} or "
                f"{CKKS!r}, not {secure.protocol!r}"
            )
        if secure is not None and secure.protocol == CKKS and decrypt is None:
            raise ConfigError("a homomorphic (ckks) job needs its key holder to decrypt the sums")
        if secure is not None and secure.protocol == SECAGG_PLUS and identities is None:
            raise ConfigError("a SecAgg+ job needs the clients' enrolled identity keys")
        self._identities = identities
        self.coordinator = coordinator
        self.settings = settings
        self._plays = plays
        self._candidates = candidates
        self._on_closed = on_closed
        self._round_config = round_config
        self._decrypt = decrypt
        self._admit = admit
        self._decryptions: set[asyncio.Task[None]] = set()  # at most one per round, in flight
        self.finished: RunFinished | None = None  # set once the last round is done
        self._offers: dict[str, Offer] = {}
        self._secure_stage: Stage | None = None  # the open stage of a secure round
        self._secure_cohort: set[str] = set()  # offered that stage: they wait for the next
        self._timers: dict[Stage | None, tuple[float, Any]] = {}  # by stage
        self._closed: asyncio.Future[RoundSummary] | None = None
        self._commit: CommitVersion | None = None
        self._arrivals = asyncio.Event()  # set when a waiting round should list clients again
        self._awaited: Awaited | None = None  # what a round waiting for clients needs
        self._sha_of: tuple[Parameters, str] | None = None
        self._excluded: dict[str, set[str]] = {}  # this round's: criterion -> clients turned away

    # --- what the transport calls ------------------------------------------------------

    def check_in(self, client_id: str) -> CheckInAnswer:
        """A client asks for work: its task in the current round, when to come back, or the end.

        A client of a secure round between two stages comes back within
        ``SECURE_STAGE_RETRY_S``, so that a stage does not cost a full retry interval.
        """
        awaited = self._awaited
        if awaited is None or awaited.arrived(client_id):
            self._arrivals.set()
        if self.finished is not None:
            return self.finished
        offer = self._offers.get(client_id)
        if offer is None and client_id in self._secure_cohort:
            seconds = min(self.settings.retry_after_s, SECURE_STAGE_RETRY_S)
            return RetryLater(seconds, "waiting for the next secure-aggregation stage")
        if offer is None:
            return RetryLater(self.settings.retry_after_s, "no task for this client now")
        timer = self._timers.get(offer_stage(offer))
        remaining = 0.0 if timer is None else max(0.0, timer[0] - self._now())
        return replace(offer, deadline_in_s=remaining)

    def exclude(self, client_id: str, criteria: Iterable[str]) -> None:
        """The eligibility policy turned ``client_id`` away for ``criteria`` in this round.

        Each closed round's summary counts the distinct clients turned away
        for each criterion (a client failing two counts under each), from the
        close of the round before until it closes.
        """
        for criterion in criteria:
            self._excluded.setdefault(criterion, set()).add(client_id)

    def submit_update(
        self,
        client_id: str,
        round_number: int,
        update: np.ndarray,
        num_examples: int,
        metrics: Mapping[str, float],
        authentication: Authentication = Authentication.NONE,
        *,
        upload_bytes: int | None = None,
    ) -> RejectSubmission | None:
        """A client's training result; returns the rejection, or None if it counted.

        ``authentication``: how the caller knows the sender (the service: VERIFIED);
        ``upload_bytes``: what its upload took on the wire.
        """
        event = UpdateReceived(
            client_id,
            round_number,
            self._now(),
            update,
            num_examples,
            metrics,
            authentication,
            upload_bytes,
        )
        return self._submit(client_id, event)

    def screen_upload(
        self, client_id: str, round_number: int, *, secure: bool = False
    ) -> RejectSubmission | None:
        """The rejection a training result of ``client_id`` for ``round_number`` would get
        whatever it holds (see :meth:`Coordinator.screen_upload`), or None."""
        if self.coordinator.state is RoundState.FINISHED:
            return RejectSubmission(client_id, round_number, RejectReason.LATE, _FINISHED)
        return self.coordinator.screen_upload(client_id, round_number, secure=secure)

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

    def submit_secure(
        self,
        client_id: str,
        round_number: int,
        message: SecureReply,
        authentication: Authentication = Authentication.NONE,
    ) -> RejectSubmission | None:
        """A client's secure-round reply; returns the rejection, or None if the protocol took it.

        The offer it answers is withdrawn first: taking the reply may close the
        stage and offer this client its next request. A repeated reply (a retried
        upload) withdraws nothing, so it cannot swallow that next offer.
        """
        if self.coordinator.state is RoundState.FINISHED:
            return RejectSubmission(client_id, round_number, RejectReason.LATE, _FINISHED)
        offer = self._offers.get(client_id)
        if offer is not None and (offer.round, offer_stage(offer)) == (round_number, message.stage):
            del self._offers[client_id]
        event = SecureMessageReceived(client_id, round_number, self._now(), message, authentication)
        actions = self._apply(event)
        return next((a for a in actions if isinstance(a, RejectSubmission)), None)

    def report_failure(
        self, client_id: str, round_number: int, reason: str
    ) -> RejectSubmission | None:
        """A client gave up on its task (it raised, or ran out of battery); returns the rejection.

        Only a failure of a cohort member in the round now collecting counts;
        the engine rejects one about another round (the client's task of this
        round stands), from outside the cohort, or repeated.
        """
        if self.coordinator.state is RoundState.FINISHED:
            return RejectSubmission(client_id, round_number, RejectReason.LATE, _FINISHED)
        actions = self._apply(ClientFailed(client_id, round_number, self._now(), reason))
        rejection = next((a for a in actions if isinstance(a, RejectSubmission)), None)
        if rejection is None:
            self._offers.pop(client_id, None)
            self._secure_cohort.discard(client_id)
        return rejection

    # --- the round loop --------------------------------------------------------------------

    async def run(self, *, finished: str = "the run is complete") -> None:
        """Play every scheduled round; returns when the last one has closed and been recorded.

        From then on every check-in is answered ``RunFinished(finished)``.
        """
        for play in self._plays:
            if await self._play(play) is None:
                break  # the run layer ended training (the privacy budget)
        self._apply(FinishRun())
        self.finished = RunFinished(finished)
        for pending in self._decryptions:  # a key holder still answering a closed round
            pending.cancel()

    async def _play(self, play: Play) -> RoundSummary | None:
        admission = await self._admitted(play)
        if admission.stop is not None:
            return None
        candidates = admission.candidates
        self._closed = asyncio.get_running_loop().create_future()
        self._commit = None
        config = {} if self._round_config is None else self._round_config(play)
        keys = {} if self._identities is None else self._identities(candidates)
        start = StartRound(play.round, play.phase, self._now(), tuple(candidates), config, keys)
        self._apply(start)
        summary = replace(
            await self._closed,
            excluded={criterion: len(ids) for criterion, ids in sorted(self._excluded.items())},
        )
        self._excluded = {}
        if self._on_closed is not None:  # persisted before anyone is offered the new model
            await self._on_closed(summary, self._commit)
        return summary

    async def _admitted(self, play: Play) -> Admission:
        """Wait, without polling on a fixed beat, until the run layer admits the round.

        The clients are listed again (a read of the registry) once as many newcomers as the
        round is short of have checked in, or every ``retry_after_s``: not at every check-in,
        which for a round waiting on a thousand clients was a thousand listings a second.
        """
        logged: str | None = None
        try:
            while True:
                admission, listed = self._admission(play)
                if admission.wait is None:
                    return admission
                if admission.wait != logged:  # once per reason, not once per check-in
                    log.info("%s", admission.wait)
                    logged = admission.wait
                self._awaited = Awaited(frozenset(listed), admission.short)
                self._arrivals.clear()
                try:
                    await asyncio.wait_for(
                        self._arrivals.wait(), timeout=self.settings.retry_after_s
                    )
                except TimeoutError:
                    continue  # eligibility also changes with time (a client's last check-in ages)
        finally:
            self._awaited = None

    def _admission(self, play: Play) -> tuple[Admission, tuple[str, ...]]:
        """The run layer's answer for ``play``, and the clients listed for it."""
        try:
            listed = tuple(self._candidates())
        except RegistryError as exc:  # the population cannot be established: wait, never guess
            wait = (
                f"round {play.round} waits: the registry cannot list the eligible clients ({exc})"
            )
            return Admission((), wait=wait), ()
        if self._admit is not None:
            return self._admit(play, listed), listed
        needed = self.coordinator.settings.quorum_count(play.phase)
        if len(listed) < needed:
            wait = f"round {play.round} waits: {len(listed)} eligible clients, {needed} needed"
            return Admission(listed, wait=wait, short=needed - len(listed)), listed
        return Admission(listed), listed

    # --- actions -----------------------------------------------------------------------------

    def _submit(
        self, client_id: str, event: UpdateReceived | EvaluationReceived
    ) -> RejectSubmission | None:
        if self.coordinator.state is RoundState.FINISHED:
            return RejectSubmission(client_id, event.round, RejectReason.LATE, _FINISHED)
        actions = self._apply(event)
        offer = self._offers.get(client_id)
        if offer is not None and offer.round == event.round:  # a late result keeps today's offer
            del self._offers[client_id]
        return next((a for a in actions if isinstance(a, RejectSubmission)), None)

    def _apply(self, event: Event) -> list[Action]:
        actions = self.coordinator.handle(event)
        for action in actions:
            self._carry_out(action)
        return actions

    def _carry_out(self, action: Action) -> None:
        match action:
            case SendFitTask():
                self._offer(
                    action.client_id,
                    TaskOffer(
                        action.round,
                        Phase.FIT,
                        action.config,
                        self.model_sha256(),
                        0.0,
                        action.secure,  # SecAgg+'s masked-input or CKKS's encryption request
                    ),
                )
            case SendEvaluateTask():
                self._offer(
                    action.client_id,
                    TaskOffer(
                        action.round, Phase.EVALUATE, action.config, self.model_sha256(), 0.0
                    ),
                )
            case SendSecureRequest():
                self._offer(action.client_id, SecureOffer(action.round, action.request, 0.0))
            case ScheduleDeadline():
                self._schedule(action)
            case CommitVersion():
                self._commit = action
            case RequestDecryption():
                task = asyncio.get_running_loop().create_task(self._decrypted(action))
                self._decryptions.add(task)
                task.add_done_callback(self._decryptions.discard)
            case RoundClosed():
                self._offers.clear()
                self._secure_stage = None
                self._secure_cohort.clear()
                for _, timer in self._timers.values():
                    timer.cancel()
                self._timers.clear()
                if self._closed is not None and not self._closed.done():
                    self._closed.set_result(action.summary)
            case RejectSubmission():
                log.info("rejected %s: %s", action.client_id, action.reason.value)

    def _offer(self, client_id: str, offer: Offer) -> None:
        """Offer work to a client; a secure round's next stage withdraws the last one's offers."""
        stage = offer_stage(offer)
        if stage is not None and stage is not self._secure_stage:
            # the stage closed: its unanswered offers expire, its members no longer wait
            self._offers = {c: o for c, o in self._offers.items() if offer_stage(o) is None}
            self._secure_stage = stage
            self._secure_cohort = set()
        if stage is not None:
            self._secure_cohort.add(client_id)
        self._offers[client_id] = offer

    def _schedule(self, action: ScheduleDeadline) -> None:
        """One timer per stage (a plain round's deadline is the stage None)."""
        previous = self._timers.get(action.stage)
        if previous is not None:
            previous[1].cancel()
        timer = self._clock().call_at(action.at, self._deadline, action.round, action.stage)
        self._timers[action.stage] = (action.at, timer)

    def model_sha256(self) -> str:
        """The sha256 of the current global model, hashed once per model, not per request."""
        parameters = self.coordinator.parameters
        if self._sha_of is None or self._sha_of[0] is not parameters:
            self._sha_of = (parameters, parameters.sha256())
        return self._sha_of[1]

    def _deadline(self, round_number: int, stage: Stage | None) -> None:
        self._apply(DeadlineReached(round_number, self._now(), stage))

    async def _decrypted(self, action: RequestDecryption) -> None:
        """Ask the key holder for the round's sum; its answer or refusal goes to the engine."""
        assert self._decrypt is not None
        try:
            total = await self._decrypt(action)
            answer = AggregateDecrypted(action.round, self._now(), total)
        except Exception as exc:  # whatever went wrong, the round must close (it aborts)
            log.error("the key holder did not decrypt round %d: %s", action.round, exc)
            answer = AggregateDecrypted(action.round, self._now(), None, str(exc))
        self._apply(answer)

    def _clock(self) -> Clock:
        clock = self.settings.clock
        return asyncio.get_running_loop() if clock is None else clock

    def _now(self) -> float:
        return self._clock().time()
