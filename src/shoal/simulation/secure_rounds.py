"""Secure fit rounds in the simulator: SecAgg+ played in virtual time with real cryptography.

Each simulated device runs a real :class:`SecAggClient`; its protocol
messages reach the coordinator after the latency and transfer time of its
device class. A device may vanish at any stage (``secure_aggregation.
stage_dropout``, drawn from the run's seed) besides the fleet's own training
dropouts and stragglers; the stage then closes at its deadline and the
protocol recovers what it can. The coordinator only ever receives masked
vectors and, in the end, their sum. Each simulated client signs with an
Ed25519 key made for the run (:class:`SimulatedIdentities`), whose public
half the coordinator is given, as a deployment's registry would.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from shoal.client.handler import FitOutcome, secure_contribution
from shoal.coordinator.events import (
    Action,
    AggregateDecrypted,
    Authentication,
    ClientFailed,
    CommitVersion,
    DeadlineReached,
    Event,
    RequestDecryption,
    RoundClosed,
    RoundSummary,
    ScheduleDeadline,
    SecureMessageReceived,
    SendFitTask,
    SendSecureRequest,
)
from shoal.coordinator.selection import Stream, client_key, round_rng
from shoal.core.errors import ClientError, ProtocolError, RunError, SecurityError, TransportError
from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.consistency import IdentityKey
from shoal.secure.homomorphic import EncryptionRequest, SiloCredentials
from shoal.secure.messages import ClientMessage, ServerRequest, Stage
from shoal.secure.serde import message_size
from shoal.simulation.devices import Attempt
from shoal.simulation.dropouts import DROPPED_REASON
from shoal.simulation.executor import Executor, Job, Outcome

if TYPE_CHECKING:
    from shoal.simulation.runner import Simulation


@dataclass(order=True, slots=True)
class _Arrival:
    """Something that reaches the coordinator at virtual time ``at``."""

    at: float
    order: int
    make: Callable[[float], Event] = field(compare=False)


class SimulatedIdentities(Mapping[str, bytes]):
    """Each simulated client's Ed25519 identity for this run, made on first use.

    As a mapping it holds the public keys (what the coordinator knows); the
    player takes the private ones to sign with.
    """

    def __init__(self, client_ids: Collection[str]) -> None:
        self._ids = client_ids  # the population's names: membership costs no table
        self._keys: dict[str, IdentityKey] = {}

    def key(self, client_id: str) -> IdentityKey:
        if client_id not in self._ids:
            raise KeyError(client_id)
        key = self._keys.get(client_id)
        if key is None:
            key = self._keys[client_id] = IdentityKey.generate()
        return key

    def __getitem__(self, client_id: str) -> bytes:
        return self.key(client_id).public

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(slots=True)
class SecureTraffic:
    """Bytes each way and the attempts of one secure round, for the metrics row."""

    bytes_up: int = 0
    bytes_down: int = 0
    masked_inputs: int = 0
    reported_drops: int = 0  # drops the coordinator was told of before the round closed
    attempts: dict[str, Attempt] = field(default_factory=dict)


SIMULATED_KEY_HOLDER = "the consortium's key holder (simulated)"


class SecureRoundPlayer:
    """Plays one secure fit round of ``simulation``; see the module docstring."""

    def __init__(self, simulation: Simulation, executor: Executor, round_number: int) -> None:
        self.simulation = simulation
        self.executor = executor
        self.round = round_number
        self.traffic = SecureTraffic()
        self._clients: dict[str, SecAggClient] = {}
        self._queue: list[_Arrival] = []
        self._order = 0
        self._deadlines: dict[Stage, float] = {}
        self._trained: dict[str, Outcome] = {}

    def play(self, actions: list[Action], now: float) -> tuple[RoundSummary, CommitVersion | None]:
        """Carry out the round's first actions and deliver everything until it closes."""
        commit: CommitVersion | None = None
        self._carry_out(actions, now)
        while self._queue:
            arrival = heapq.heappop(self._queue)
            actions = self.simulation.coordinator.handle(arrival.make(arrival.at))
            commit = next((a for a in actions if isinstance(a, CommitVersion)), commit)
            closed = next((a.summary for a in actions if isinstance(a, RoundClosed)), None)
            if closed is not None:
                return closed, commit
            self._carry_out(actions, arrival.at)
        raise RunError(f"secure round {self.round} never closed")  # stage deadlines close it

    # --- actions --------------------------------------------------------------------------

    def _carry_out(self, actions: list[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, ScheduleDeadline):
                stage = Stage.MASKED_INPUT if action.stage is None else action.stage
                self._deadlines[stage] = action.at
                self._push(action.at, _deadline_event(self.round, action.stage))
            elif isinstance(action, RequestDecryption):
                self._decrypt(action, now)
        fits = [a for a in actions if isinstance(a, SendFitTask)]
        for action in actions:
            if isinstance(action, SendSecureRequest):
                self._answer(action.client_id, action.request, now)
        if fits:
            self._train(fits, now)

    def _answer(self, client_id: str, request: ServerRequest, now: float) -> None:
        """The device answers a key or unmask request, unless it vanishes at this stage."""
        self.traffic.bytes_down += message_size(request)
        if self._vanishes(client_id, request.stage):
            return
        try:
            reply = self._client(client_id).handle(request)
        except (ProtocolError, SecurityError):
            return  # it refused the request (a tampered share, too few neighbours): it leaves
        self._send(client_id, reply, now + self._transfer(client_id, request, reply))

    def _train(self, tasks: list[SendFitTask], now: float) -> None:
        """Train the cohort's devices that make the deadline, then each masks its update."""
        deadline = self._deadlines[Stage.MASKED_INPUT]
        simulation = self.simulation
        plans = {task.client_id: simulation.plan_attempt(task, now, deadline) for task in tasks}
        self.traffic.attempts.update(plans)
        for task in tasks:  # the coordinator learns of a drop while the device would work
            if plans[task.client_id].dropped:
                self._push(simulation.drop_at(task, now, deadline), self._drop(task.client_id))
        on_time = [
            task
            for task in tasks
            if plans[task.client_id].arrives_at is not None
            and plans[task.client_id].arrives_at <= deadline  # type: ignore[operator]
            and not self._vanishes(task.client_id, Stage.MASKED_INPUT)
        ]
        jobs: list[Job] = [simulation.job_for(task, plans[task.client_id]) for task in on_time]
        outcomes = {
            o.client_id: o for o in self.executor.run(simulation.coordinator.parameters, jobs)
        }
        self.traffic.bytes_down += simulation.model_bytes * len(tasks)
        for task in on_time:
            outcome, arrives_at = outcomes[task.client_id], plans[task.client_id].arrives_at
            assert arrives_at is not None and task.secure is not None
            if outcome.error is not None or outcome.update is None:
                reason = outcome.error or "no update"
                self._push(arrives_at, _failure_event(task.client_id, self.round, reason))
                continue
            fit = FitOutcome(outcome.update, outcome.num_examples, outcome.metrics)
            contribution = secure_contribution(
                fit, task.config, seeded_noise=simulation.seeded_noise
            )
            if isinstance(task.secure, EncryptionRequest):
                self._encrypt(task.client_id, task.secure, contribution, arrives_at)
                continue
            try:
                reply = self._client(task.client_id).handle(task.secure, contribution)
            except (ProtocolError, SecurityError):
                continue  # a tampered share: the device leaves the round
            except ClientError as exc:  # it cannot contribute (a weight past max_weight): it says
                self._push(arrives_at, _failure_event(task.client_id, self.round, str(exc)))
                continue
            self.traffic.masked_inputs += 1
            self._send(task.client_id, reply, arrives_at)

    # --- homomorphic rounds -----------------------------------------------------------------

    def _encrypt(
        self, silo: str, request: EncryptionRequest, contribution: Contribution, at: float
    ) -> None:
        """The silo encrypts its weighted update and signs it; the larger upload takes longer."""
        consortium = self.simulation.consortium
        assert consortium is not None
        credentials = SiloCredentials(
            silo, consortium.public_context, consortium.signing_keys[silo]
        )
        message = credentials.answer(
            request,
            contribution.update,
            num_examples=contribution.num_examples,
            loss=contribution.loss,
            uniform_weight=contribution.uniform_weight,
        )
        size = message.ciphertext.num_bytes
        device = self.simulation.fleet.device_class(silo)
        extra = max(0, size - self.simulation.model_bytes) * 8 / (device.upload_mbps * 1e6)
        self.traffic.masked_inputs += 1
        self.traffic.bytes_up += size
        self._push(
            at + extra,
            lambda t: SecureMessageReceived(
                silo, self.round, t, message, Authentication.IN_PROCESS
            ),
        )

    def _decrypt(self, action: RequestDecryption, now: float) -> None:
        """The key holder's answer, a moment later; a refusal is an answer too."""
        consortium = self.simulation.consortium
        assert consortium is not None
        try:
            total = consortium.key_holder.decrypt_aggregate(
                run_id=self.simulation.config.run.name,
                round=action.round,
                aggregate=action.aggregate,
                receipts=action.receipts,
            )
            error = None
        except (SecurityError, ProtocolError, TransportError) as exc:
            total, error = None, str(exc)
        if self.simulation.lifecycle is not None:
            self.simulation.lifecycle.record_decryption(
                action.round, key_holder=SIMULATED_KEY_HOLDER, error=error
            )
        self.traffic.bytes_up += action.aggregate.num_bytes
        at = now + _KEY_HOLDER_LATENCY_S
        self._push(at, lambda t: AggregateDecrypted(action.round, t, total, error))

    # --- helpers ------------------------------------------------------------------------

    def _send(self, client_id: str, reply: ClientMessage, at: float) -> None:
        self.traffic.bytes_up += message_size(reply)
        self._push(
            at,
            lambda t: SecureMessageReceived(
                client_id, self.round, t, reply, Authentication.IN_PROCESS
            ),
        )

    def _drop(self, client_id: str) -> Callable[[float], Event]:
        def make(at: float) -> Event:
            self.traffic.reported_drops += 1
            return ClientFailed(client_id, self.round, at, DROPPED_REASON, kind="dropped")

        return make

    def _push(self, at: float, make: Callable[[float], Event]) -> None:
        heapq.heappush(self._queue, _Arrival(at, self._order, make))
        self._order += 1

    def _client(self, client_id: str) -> SecAggClient:
        client = self._clients.get(client_id)
        if client is None:
            seed = self.simulation.config.run.seed
            rng = np.random.default_rng([seed, self.round, client_key(client_id)])
            identity = self.simulation.identities.key(client_id)
            client = SecAggClient(round=self.round, identity=identity, rng=rng)
            self._clients[client_id] = client
        return client

    def _vanishes(self, client_id: str, stage: Stage) -> bool:
        chance = self.simulation.config.secure_aggregation.stage_dropout
        if chance <= 0:
            return False
        rng = round_rng(
            seed=self.simulation.config.run.seed,
            round_number=self.round,
            stream=Stream.SECURE_DROPOUT,
            client_id=client_id,
        )
        return bool(rng.random(len(Stage))[_DRAW_OF_STAGE[stage]] < chance)

    def _transfer(self, client_id: str, request: ServerRequest, reply: ClientMessage) -> float:
        device = self.simulation.fleet.device_class(client_id)
        down = message_size(request) * 8 / (device.download_mbps * 1e6)
        up = message_size(reply) * 8 / (device.upload_mbps * 1e6)
        return 2 * device.latency_s + down + up


_KEY_HOLDER_LATENCY_S = 0.5  # virtual seconds to reach the key holder and back
# one draw per stage; the consistency and unmask stages follow each other within seconds, and
# share one: a device drawn to vanish there vanishes before it signs the survivor set
_DRAW_OF_STAGE = {
    Stage.ADVERTISE_KEYS: 0,
    Stage.SHARE_KEYS: 1,
    Stage.MASKED_INPUT: 2,
    Stage.CONSISTENCY: 3,
    Stage.UNMASK: 3,
}


def _deadline_event(round_number: int, stage: Stage | None) -> Callable[[float], Event]:
    return lambda at: DeadlineReached(round_number, at, stage)


def _failure_event(client_id: str, round_number: int, reason: str) -> Callable[[float], Event]:
    return lambda at: ClientFailed(client_id, round_number, at, reason)


def secure_row_fields(summary: RoundSummary, traffic: SecureTraffic) -> dict[str, Any]:
    """The secure round's own columns of the metrics row."""
    return {"bytes_up": traffic.bytes_up, "bytes_down": traffic.bytes_down}
