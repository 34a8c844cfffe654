"""Secure rounds in the coordinator: the bridge between the round engine and the SecAgg+ server.

When secure aggregation is on, a fit round is one run of the SecAgg+
protocol over the cohort: the engine hands the cohort to a
:class:`SecureRound`, forwards it the clients' protocol messages, drops and
stage deadlines, and turns its actions into the engine's own (the training
task travels with the masked-input request). The engine only ever receives
the dequantized sum of the survivors' updates, never one client's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from shoal.aggregation.aggregators import WeightedMean
from shoal.aggregation.strategy import Strategy
from shoal.coordinator.events import (
    Action,
    ScheduleDeadline,
    SendFitTask,
    SendSecureRequest,
)
from shoal.coordinator.homomorphic import CKKS, CkksRound
from shoal.core.errors import ConfigError, NotFoundError, ProtocolError
from shoal.core.sharing import (
    MAX_ROUND_FAILURE,
    check_threshold_fraction,
    default_degree,
    degree_needed,
    reconstruction_threshold,
    round_failure_bound,
)
from shoal.registry import ClientRegistry
from shoal.secure.homomorphic import EncryptedUpdate
from shoal.secure.messages import ClientMessage, MaskedInputRequest, SessionConfig, Stage
from shoal.secure.quantization import Quantization
from shoal.secure.server import (
    Aborted,
    ClientDropped,
    MessageReceived,
    ScheduleStageDeadline,
    SecAggServer,
    SendRequest,
    ServerAction,
    ServerEvent,
    StageDeadline,
    StageDeadlines,
    SumReady,
)

SECAGG_PLUS = "secagg+"


@dataclass(frozen=True, slots=True)
class SecureSettings:
    """How secure rounds run: graph degree, threshold, quantization and stage deadlines.

    ``unmask_s`` bounds the consistency stage too (each client signs the survivor set).
    """

    run_id: str
    quantization: Quantization
    fit_bits: bool = True  # take the most bits the cohort size allows
    headroom_bits: int = 0  # bits kept free for noise added after quantization (distributed DP)
    degree: int | None = None  # None: about 2 log2 n neighbours
    threshold_fraction: float = 0.5
    advertise_keys_s: float = 30.0
    share_keys_s: float = 30.0
    unmask_s: float = 30.0
    protocol: str = SECAGG_PLUS
    # homomorphic aggregation (protocol "ckks"): the key holder's public context, the silos'
    # receipt keys (None: only the key holder checks signatures) and its contributor minimum
    public_context: bytes | None = None
    silo_keys: Mapping[str, bytes] | None = None
    min_contributors: int = 2

    def __post_init__(self) -> None:
        check_threshold_fraction(self.threshold_fraction)
        if self.degree is not None and self.degree < 1:
            raise ConfigError(f"secure_aggregation.degree must be >= 1, got {self.degree}")

    def quantization_for(self, max_clients: int) -> Quantization:
        """The quantization of a round of up to ``max_clients``; refuses one that could overflow."""
        if self.fit_bits:
            return self.quantization.fitted(max_clients << self.headroom_bits)
        self.quantization.check_capacity(max_clients)
        return self.quantization

    def degree_for(self, num_nodes: int) -> int:
        degree = default_degree(num_nodes) if self.degree is None else self.degree
        return max(1, min(degree, num_nodes - 1))

    def threshold_for(self, num_nodes: int) -> int:
        if num_nodes <= 1:
            return 1
        degree = self.degree_for(num_nodes)
        return reconstruction_threshold(
            degree=degree, num_nodes=num_nodes, fraction=self.threshold_fraction
        )

    def eligible(
        self, candidates: tuple[str, ...], identities: Mapping[str, bytes]
    ) -> tuple[str, ...]:
        """The candidates a secure round may select: under SecAgg+, those with an identity."""
        if self.protocol != SECAGG_PLUS:
            return candidates
        return tuple(client for client in candidates if client in identities)

    def check_dropout(self, num_nodes: int, *, dropout: float) -> None:
        """Refuse a degree whose rounds of ``num_nodes`` abort too often at ``dropout``.

        The bound is :func:`shoal.core.sharing.round_failure_bound`; the error
        names the smallest degree within :data:`MAX_ROUND_FAILURE`, if any.
        """
        if self.protocol != SECAGG_PLUS or num_nodes <= 1 or dropout <= 0:
            return
        degree = self.degree_for(num_nodes)
        failure = round_failure_bound(
            num_nodes=num_nodes,
            degree=degree,
            threshold=self.threshold_for(num_nodes),
            dropout=dropout,
        )
        if failure <= MAX_ROUND_FAILURE:
            return
        needed = degree_needed(
            num_nodes=num_nodes, fraction=self.threshold_fraction, dropout=dropout
        )
        advice = (
            f"set secure_aggregation.degree = {needed} or more"
            if needed is not None
            else "no degree is enough: select more clients per round or expect less dropout"
        )
        raise ConfigError(
            f"secure_aggregation.degree = {degree} over {num_nodes} clients aborts a round with "
            f"probability up to {min(failure, 1.0):.0%} at {dropout:.0%} dropout, above the "
            f"{MAX_ROUND_FAILURE:.0%} allowed: {advice}"
        )


def enrolled_identities(clients: ClientRegistry) -> Callable[[Sequence[str]], dict[str, bytes]]:
    """The registry's Ed25519 public keys of the given clients, for SecAgg+'s signatures.

    These keys are the PKI the consistency check rests on: an operator (or a
    compromised coordinator) that can enroll identities at will can also
    answer for them (see the README's security section).
    """

    def lookup(client_ids: Sequence[str]) -> dict[str, bytes]:
        keys = {}
        for client_id in client_ids:
            try:
                public_key = clients.get(client_id).public_key
            except NotFoundError:
                continue
            if public_key is not None:
                keys[client_id] = public_key
        return keys

    return lookup


def check_secure_strategy(strategy: Strategy) -> None:
    """Refuse strategies that need each client's update, which secure aggregation hides."""
    if not isinstance(strategy.aggregator, WeightedMean):
        raise ConfigError(
            f"secure aggregation reveals only the sum of the updates, but the "
            f"{strategy.name!r} strategy's {type(strategy.aggregator).__name__} aggregator needs "
            "each client's update; use a mean-based strategy (fedavg, fedavgm, fedprox, fedadam, "
            "fedyogi, fedadagrad) or switch secure aggregation off"
        )


class SecureRound:
    """One fit round under SecAgg+; see the module docstring."""

    def __init__(
        self,
        settings: SecureSettings,
        *,
        round_number: int,
        cohort: Sequence[str],
        vector_length: int,
        target: int,
        min_survivors: int,
        masked_input_s: float,
        identities: Mapping[str, bytes],
    ) -> None:
        num_nodes = len(cohort)
        session = SessionConfig(
            run_id=settings.run_id,
            round=round_number,
            num_nodes=num_nodes,
            vector_length=vector_length,
            threshold=settings.threshold_for(num_nodes),
            quantization=settings.quantization_for(num_nodes),
        )
        deadlines = StageDeadlines(
            advertise_keys=settings.advertise_keys_s,
            share_keys=settings.share_keys_s,
            masked_input=masked_input_s,
            unmask=settings.unmask_s,
            consistency=settings.unmask_s,
        )
        seed = hashlib.sha256(f"{settings.run_id}/{round_number}".encode()).digest()
        self.protocol = settings.protocol
        self.round = round_number
        self.server = SecAggServer(
            session,
            sorted(cohort),
            degree=settings.degree_for(num_nodes),
            graph_seed=seed,
            deadlines=deadlines,
            min_survivors=min_survivors,
            identities=identities,
            target=target,
        )

    @property
    def survivors_needed(self) -> int:
        """The fewest members that must stay for the round to give a sum."""
        return self.server.min_survivors

    def start(self, now: float, task: Callable[[str], SendFitTask]) -> list[Action]:
        return self._translate(self.server.start(now), task)

    def message(
        self,
        client_id: str,
        message: ClientMessage | EncryptedUpdate,
        now: float,
        task: Callable[[str], SendFitTask],
    ) -> tuple[list[Action], SumReady | Aborted | None]:
        """Forward a client's message; raises StaleMessage or ProtocolError when refused."""
        if isinstance(message, EncryptedUpdate):
            raise ProtocolError("a SecAgg+ round takes masked inputs, not encrypted updates")
        return self._handle(MessageReceived(client_id, message, now), task)

    def dropped(
        self, client_id: str, now: float, task: Callable[[str], SendFitTask]
    ) -> tuple[list[Action], SumReady | Aborted | None]:
        return self._handle(ClientDropped(client_id, now), task)

    def deadline(
        self, stage: Stage | None, now: float, task: Callable[[str], SendFitTask]
    ) -> tuple[list[Action], SumReady | Aborted | None]:
        if stage is None:
            return [], None  # a secure round only sets stage deadlines
        return self._handle(StageDeadline(stage, now), task)

    def _handle(
        self, event: ServerEvent, task: Callable[[str], SendFitTask]
    ) -> tuple[list[Action], SumReady | Aborted | None]:
        server_actions = self.server.handle(event)
        outcome = next((a for a in server_actions if isinstance(a, SumReady | Aborted)), None)
        return self._translate(server_actions, task), outcome

    def _translate(
        self, server_actions: list[ServerAction], task: Callable[[str], SendFitTask]
    ) -> list[Action]:
        actions: list[Action] = []
        for action in server_actions:
            match action:
                case SendRequest(client_id=client, request=MaskedInputRequest() as request):
                    actions.append(replace(task(client), secure=request))
                case SendRequest(client_id=client, request=request):
                    actions.append(SendSecureRequest(client, self.round, request))
                case ScheduleStageDeadline(stage=stage, at=at):
                    actions.append(ScheduleDeadline(self.round, at, stage))
        return actions


def open_secure_round(
    settings: SecureSettings,
    *,
    round_number: int,
    cohort: Sequence[str],
    vector_length: int,
    target: int,
    quorum: int,
    deadline_s: float,
    identities: Mapping[str, bytes],
) -> SecureRound | CkksRound:
    """The secure session of one fit round, for the configured protocol.

    ``identities`` are the cohort's Ed25519 public keys, which SecAgg+ clients sign with.
    """
    if settings.protocol != CKKS:
        return SecureRound(
            settings,
            round_number=round_number,
            cohort=cohort,
            vector_length=vector_length,
            target=target,
            min_survivors=quorum,
            masked_input_s=deadline_s,
            identities=identities,
        )
    if settings.public_context is None:
        raise ConfigError("homomorphic aggregation needs the consortium's public context")
    return CkksRound(
        run_id=settings.run_id,
        round_number=round_number,
        cohort=cohort,
        vector_length=vector_length,
        target=target,
        min_contributors=max(settings.min_contributors, quorum),
        public_context=settings.public_context,
        silo_keys=settings.silo_keys,
        deadline_s=deadline_s,
    )
