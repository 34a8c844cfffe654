"""The SecAgg+ server: a sans-IO state machine that learns only the sum of the inputs.

``SecAggServer.handle(event)`` takes a client's message, a stage deadline or
a client's reported failure, and returns actions: requests to send, a
deadline to set, and in the end either the dequantized sum or an abort. It
never reads a clock or touches a socket. Stages move by a literal transition
table; a message of an earlier stage or round raises :class:`StaleMessage`,
one the table does not allow raises :class:`IllegalTransition`, and neither
changes anything.

A stage closes as soon as every client it waits for has answered, when the
masked-input stage has its target count, when the unmask stage holds enough
shares for every secret, or at its deadline, whichever comes first: a stalled
client never holds a stage past its deadline. The server only ever holds the
running modular sum of masked inputs, never one client's plaintext.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from shoal.core.errors import IllegalTransition, ProtocolError, SecurityError
from shoal.secure.client import limbs_from_bytes
from shoal.secure.crypto import KeyPair, Purpose, SessionContext, agree, expand_mask
from shoal.secure.graph import Graph, neighbour_graph
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    ClientMessage,
    KeysAdvertised,
    MaskedInput,
    MaskedInputRequest,
    PublicKeys,
    ServerRequest,
    SessionConfig,
    ShareKeysRequest,
    SharesSent,
    Stage,
    StaleMessage,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.quantization import DecodedSum
from shoal.secure.shamir import field_to_bytes, reconstruct

log = logging.getLogger("shoal.secure")

_UNMASK_SPARE = 1  # holders beyond the threshold before the masked-input stage closes early
STAGES = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)


@dataclass(frozen=True, slots=True)
class StageDeadlines:
    """Seconds each stage may last; the masked-input stage includes local training."""

    advertise_keys: float = 30.0
    share_keys: float = 30.0
    masked_input: float = 600.0
    unmask: float = 30.0

    def __post_init__(self) -> None:
        if min(self.advertise_keys, self.share_keys, self.masked_input, self.unmask) <= 0:
            raise ProtocolError("every stage deadline must be positive")

    def of(self, stage: Stage) -> float:
        return float(getattr(self, stage.name.lower()))


# --- events in ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A client's message arrived at ``now``."""

    client_id: str
    message: ClientMessage
    now: float


@dataclass(frozen=True, slots=True)
class StageDeadline:
    """The deadline the server asked for ``stage`` went off."""

    stage: Stage
    now: float


@dataclass(frozen=True, slots=True)
class ClientDropped:
    """The shell knows ``client_id`` is gone (it failed or disconnected)."""

    client_id: str
    now: float


ServerEvent = MessageReceived | StageDeadline | ClientDropped


class Step(enum.Enum):
    """The server's own steps, which move it without an outside event."""

    STAGE_CLOSED = "stage closed"
    TOO_FEW_SURVIVORS = "too few survivors"


# --- actions out -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Deliver ``request`` to ``client_id``."""

    client_id: str
    request: ServerRequest


@dataclass(frozen=True, slots=True)
class ScheduleStageDeadline:
    """Deliver ``StageDeadline(stage, at)`` when the clock reaches ``at``."""

    stage: Stage
    at: float


@dataclass(frozen=True, slots=True)
class SecureSum:
    """The outcome of a secure round: the sum of the survivors' inputs, and who took part."""

    decoded: DecodedSum
    contributors: tuple[str, ...]  # whose masked inputs are in the sum
    recovered: tuple[str, ...]  # dropped after sharing keys; their pairwise masks were rebuilt
    dropped: Mapping[str, int]  # how many clients dropped at each stage


@dataclass(frozen=True, slots=True)
class SumReady:
    """The protocol finished: here is the sum."""

    result: SecureSum


@dataclass(frozen=True, slots=True)
class Aborted:
    """The protocol cannot finish (too few survivors or shares); nothing was learned."""

    reason: str
    dropped: Mapping[str, int]


ServerAction = SendRequest | ScheduleStageDeadline | SumReady | Aborted

_S = Stage
_MESSAGE_OF_STAGE: Final[Mapping[Stage, type[ClientMessage]]] = {
    _S.ADVERTISE_KEYS: KeysAdvertised,
    _S.SHARE_KEYS: SharesSent,
    _S.MASKED_INPUT: MaskedInput,
    _S.UNMASK: UnmaskShares,
}

Trigger = type[ClientMessage] | type[StageDeadline] | type[ClientDropped] | Step

SERVER_TRANSITIONS: Final[Mapping[tuple[Stage, Trigger], Stage]] = {
    # each stage takes its own message, deadlines and drop reports until it closes
    (_S.ADVERTISE_KEYS, KeysAdvertised): _S.ADVERTISE_KEYS,
    (_S.SHARE_KEYS, SharesSent): _S.SHARE_KEYS,
    (_S.MASKED_INPUT, MaskedInput): _S.MASKED_INPUT,
    (_S.UNMASK, UnmaskShares): _S.UNMASK,
    **{(stage, StageDeadline): stage for stage in STAGES},
    **{(stage, ClientDropped): stage for stage in STAGES},
    (_S.ADVERTISE_KEYS, Step.STAGE_CLOSED): _S.SHARE_KEYS,
    (_S.SHARE_KEYS, Step.STAGE_CLOSED): _S.MASKED_INPUT,
    (_S.MASKED_INPUT, Step.STAGE_CLOSED): _S.UNMASK,
    (_S.UNMASK, Step.STAGE_CLOSED): _S.FINISHED,
    **{(stage, Step.TOO_FEW_SURVIVORS): _S.ABORTED for stage in STAGES},
    # once over, stale timers and drop reports change nothing
    (_S.FINISHED, StageDeadline): _S.FINISHED,
    (_S.FINISHED, ClientDropped): _S.FINISHED,
    (_S.ABORTED, StageDeadline): _S.ABORTED,
    (_S.ABORTED, ClientDropped): _S.ABORTED,
}


@dataclass(slots=True)
class _Books:
    """What the server knows about each node."""

    keys: dict[int, PublicKeys] = field(default_factory=dict)  # U1
    routed: dict[int, dict[int, bytes]] = field(
        default_factory=dict
    )  # receiver -> sender -> sealed
    shared: set[int] = field(default_factory=set)  # U2
    masked: set[int] = field(default_factory=set)  # U3
    total: npt.NDArray[np.uint32] | None = None
    seed_shares: dict[int, dict[int, npt.NDArray[np.int64]]] = field(default_factory=dict)
    key_shares: dict[int, dict[int, npt.NDArray[np.int64]]] = field(default_factory=dict)
    unmasked: set[int] = field(default_factory=set)  # U4
    gone: set[int] = field(default_factory=set)  # reported dropped by the shell
    dropped: dict[str, int] = field(default_factory=dict)


class SecAggServer:
    """The server's side of one secure round; see the module docstring."""

    def __init__(
        self,
        session: SessionConfig,
        client_ids: Sequence[str],
        *,
        degree: int,
        graph_seed: bytes,
        deadlines: StageDeadlines,
        min_survivors: int,
        target: int | None = None,
    ) -> None:
        if len(client_ids) != session.num_nodes or len(set(client_ids)) != len(client_ids):
            raise ProtocolError("the session needs one distinct client per node")
        self.session = session
        self.deadlines = deadlines
        self.min_survivors = max(min_survivors, session.threshold)
        self.target = session.num_nodes if target is None else target
        self.stage = Stage.ADVERTISE_KEYS
        self.nodes: dict[str, int] = {client: i for i, client in enumerate(client_ids, start=1)}
        self.clients: dict[int, str] = {i: client for client, i in self.nodes.items()}
        self.graph: Graph = neighbour_graph(session.num_nodes, degree=degree, seed=graph_seed)
        self._books = _Books()
        self._context = SessionContext(run_id=session.run_id, round=session.round)
        self._started = False

    # --- the entry points ------------------------------------------------------------------

    def start(self, now: float) -> list[ServerAction]:
        """Open stage 1: every client gets the session and its neighbours."""
        if self._started:
            raise IllegalTransition("the session has already started")
        self._started = True
        actions: list[ServerAction] = [
            SendRequest(
                client,
                AdvertiseKeysRequest(
                    round=self.session.round,
                    session=self.session,
                    node=node,
                    neighbours=self.graph[node],
                ),
            )
            for node, client in self.clients.items()
        ]
        return [*actions, self._deadline(now)]

    def handle(self, event: ServerEvent) -> list[ServerAction]:
        """Apply one event; returns the actions for the shell, in order."""
        trigger: Trigger = (
            type(event.message) if isinstance(event, MessageReceived) else type(event)
        )
        if isinstance(event, MessageReceived):
            self._fence(event)
        self.stage = self._next(trigger)
        match event:
            case MessageReceived():
                return self._receive(event)
            case StageDeadline():
                if event.stage is not self.stage:
                    return []  # the timer of a stage already closed
                return self._close(event.now)
            case ClientDropped():
                return self._drop(event)

    @property
    def expected(self) -> set[int]:
        """The nodes the current stage waits for."""
        books = self._books
        waiting = {
            Stage.ADVERTISE_KEYS: set(self.clients),
            Stage.SHARE_KEYS: set(books.keys),
            Stage.MASKED_INPUT: set(books.shared),
            Stage.UNMASK: set(books.masked),
        }.get(self.stage, set())
        return waiting - books.gone

    # --- fencing and transitions -----------------------------------------------------------

    def _fence(self, event: MessageReceived) -> None:
        message = event.message
        if message.round != self.session.round:
            raise StaleMessage(
                f"{event.client_id} sent a {message.stage.label} message of round "
                f"{message.round}; this session is round {self.session.round}"
            )
        if event.client_id not in self.nodes:
            raise ProtocolError(f"{event.client_id} is not part of this secure round")
        if message.stage < self.stage:
            raise StaleMessage(
                f"{event.client_id} sent a {message.stage.label} message, "
                f"but the session is at {self.stage.label}"
            )

    def _next(self, trigger: Trigger) -> Stage:
        try:
            return SERVER_TRANSITIONS[(self.stage, trigger)]
        except KeyError:
            name = trigger.value if isinstance(trigger, Step) else trigger.__name__
            raise IllegalTransition(
                f"{name} is not allowed while the secure round is at {self.stage.label}"
            ) from None

    # --- receiving ---------------------------------------------------------------------------

    def _receive(self, event: MessageReceived) -> list[ServerAction]:
        node = self.nodes[event.client_id]
        if node not in self.expected or node in self._answered():
            raise ProtocolError(
                f"{event.client_id} is not expected at {self.stage.label} "
                "(it answered already, dropped before, or was never asked)"
            )
        match event.message:
            case KeysAdvertised():
                self._books.keys[node] = event.message.keys
            case SharesSent():
                self._take_shares(node, event.message)
            case MaskedInput():
                self._take_masked_input(node, event.message)
            case UnmaskShares():
                self._take_unmask_shares(node, event.message)
        return self._close(event.now) if self._stage_complete() else []

    def _take_shares(self, node: int, message: SharesSent) -> None:
        expected = self.graph[node] & set(self._books.keys)
        if set(message.sealed_shares) != expected:
            raise ProtocolError(
                f"{self.clients[node]} sent shares for {sorted(message.sealed_shares)}, "
                f"expected one for each of {sorted(expected)}"
            )
        for receiver, sealed in message.sealed_shares.items():
            self._books.routed.setdefault(receiver, {})[node] = sealed
        self._books.shared.add(node)

    def _take_masked_input(self, node: int, message: MaskedInput) -> None:
        if message.vector.size != self.session.masked_length:
            raise ProtocolError(
                f"{self.clients[node]} sent {message.vector.size} masked values, "
                f"expected {self.session.masked_length}"
            )
        books = self._books
        if books.total is None:
            books.total = message.vector.copy()
        else:
            np.add(books.total, message.vector, out=books.total)  # wraps modulo 2^32
        books.masked.add(node)

    def _take_unmask_shares(self, node: int, message: UnmaskShares) -> None:
        books = self._books
        asked_seeds, asked_keys = self._unmask_lists(node)
        if set(message.seed_shares) != asked_seeds or set(message.key_shares) != asked_keys:
            raise ProtocolError(f"{self.clients[node]} answered another unmask request")
        seeds = {owner: limbs_from_bytes(data) for owner, data in message.seed_shares.items()}
        keys = {owner: limbs_from_bytes(data) for owner, data in message.key_shares.items()}
        for owner, limbs in seeds.items():
            books.seed_shares.setdefault(owner, {})[node] = limbs
        for owner, limbs in keys.items():
            books.key_shares.setdefault(owner, {})[node] = limbs
        books.unmasked.add(node)

    def _drop(self, event: ClientDropped) -> list[ServerAction]:
        node = self.nodes.get(event.client_id)
        if node is None or node not in self.expected:
            return []
        self._books.gone.add(node)
        return self._close(event.now) if self._stage_complete() else []

    def _stage_complete(self) -> bool:
        books = self._books
        # over-selection: the first `target` inputs are enough, when every secret the unmask
        # stage needs has holders to spare among them
        if (
            self.stage is Stage.MASKED_INPUT
            and len(books.masked) >= self.target
            and self._recoverable(books.masked, spare=_UNMASK_SPARE)
        ):
            return True
        if self.stage is Stage.UNMASK and self._enough_shares():
            return True
        return not (self.expected - self._answered())

    def _recoverable(self, masked: set[int], *, spare: int) -> bool:
        """Whether ``masked`` as U3 leaves ``spare`` holders over the threshold for each secret."""
        books, needed = self._books, self.session.threshold + spare
        if any(len(self.graph[node] & masked) + 1 < needed for node in masked):
            return False
        dropped = books.shared - masked
        return all(
            not (self.graph[node] & masked) or len(self.graph[node] & masked) >= needed
            for node in dropped
        )

    def _answered(self) -> set[int]:
        """The nodes that answered the current stage."""
        books = self._books
        return {
            Stage.ADVERTISE_KEYS: set(books.keys),
            Stage.SHARE_KEYS: books.shared,
            Stage.MASKED_INPUT: books.masked,
            Stage.UNMASK: books.unmasked,
        }.get(self.stage, set())

    # --- closing stages --------------------------------------------------------------------

    def _close(self, now: float) -> list[ServerAction]:
        stage, books = self.stage, self._books
        if stage is Stage.ADVERTISE_KEYS:
            self._prune_isolated()
        survivors = self._answered()
        waited = {
            Stage.ADVERTISE_KEYS: set(self.clients),
            Stage.SHARE_KEYS: set(books.keys),
            Stage.MASKED_INPUT: books.shared,
            Stage.UNMASK: books.masked,
        }[stage]
        missing = waited - survivors
        if stage is Stage.UNMASK and self._enough_shares():
            missing &= books.gone  # the rest were simply not needed any more
        books.dropped[stage.label] = len(missing)
        if stage is Stage.UNMASK:
            return self._finish()
        if len(survivors) < self.min_survivors:
            return self._abort(
                f"{len(survivors)} clients left after {stage.label}, "
                f"fewer than the {self.min_survivors} needed"
            )
        self.stage = self._next(Step.STAGE_CLOSED)
        requests = self._requests()
        return [*requests, self._deadline(now)]

    def _prune_isolated(self) -> None:
        """Drop advertisers with too few advertising neighbours to hold a t-of-n sharing."""
        keys, threshold = self._books.keys, self.session.threshold
        while True:
            isolated = [n for n in keys if len(self.graph[n] & set(keys)) + 1 < threshold]
            if not isolated:
                return
            for node in isolated:
                log.info("%s has too few live neighbours to share its keys", self.clients[node])
                del keys[node]

    def _requests(self) -> list[ServerAction]:
        books, round_number = self._books, self.session.round
        actions: list[ServerAction] = []
        if self.stage is Stage.SHARE_KEYS:
            for node in sorted(books.keys):
                peers = {
                    peer: books.keys[peer] for peer in sorted(self.graph[node] & set(books.keys))
                }
                actions.append(
                    SendRequest(self.clients[node], ShareKeysRequest(round_number, peers))
                )
        elif self.stage is Stage.MASKED_INPUT:
            for node in sorted(books.shared):
                inbox = {
                    sender: sealed
                    for sender, sealed in sorted(books.routed.get(node, {}).items())
                    if sender in books.shared
                }
                actions.append(
                    SendRequest(self.clients[node], MaskedInputRequest(round_number, inbox))
                )
        elif self.stage is Stage.UNMASK:
            for node in sorted(books.masked):
                seeds, keys = self._unmask_lists(node)
                request = UnmaskRequest(round_number, frozenset(seeds), frozenset(keys))
                actions.append(SendRequest(self.clients[node], request))
        return actions

    def _unmask_lists(self, node: int) -> tuple[frozenset[int], frozenset[int]]:
        """Whose seed shares and whose key shares ``node`` must reveal."""
        books = self._books
        peers = self.graph[node] & books.shared
        return (peers & books.masked) | {node}, peers - books.masked

    def _deadline(self, now: float) -> ScheduleStageDeadline:
        return ScheduleStageDeadline(self.stage, now + self.deadlines.of(self.stage))

    def _abort(self, reason: str) -> list[ServerAction]:
        self.stage = self._next(Step.TOO_FEW_SURVIVORS)
        self._books.total = None
        log.warning("secure round %d aborted: %s", self.session.round, reason)
        return [Aborted(reason, dict(self._books.dropped))]

    # --- unmasking -----------------------------------------------------------------------------

    def _enough_shares(self) -> bool:
        books, threshold = self._books, self.session.threshold
        return all(
            len(books.seed_shares.get(node, {})) >= threshold for node in books.masked
        ) and all(
            len(books.key_shares.get(node, {})) >= threshold for node in books.shared - books.masked
        )

    def _finish(self) -> list[ServerAction]:
        books = self._books
        if books.total is None or not self._enough_shares():
            return self._abort("too few unmask shares arrived to remove the masks")
        length = self.session.masked_length
        total = books.total
        try:
            for node in sorted(books.masked):
                seed = self._rebuild(books.seed_shares[node])
                total -= expand_mask(seed, length)
            for node in sorted(books.shared - books.masked):
                self._remove_pairwise_masks(node, total)
        except SecurityError as exc:
            return self._abort(str(exc))
        decoded = self.session.quantization.decode(total, count=len(books.masked))
        books.total = None
        self.stage = self._next(Step.STAGE_CLOSED)
        result = SecureSum(
            decoded=decoded,
            contributors=tuple(self.clients[node] for node in sorted(books.masked)),
            recovered=tuple(self.clients[node] for node in sorted(books.shared - books.masked)),
            dropped=dict(books.dropped),
        )
        return [SumReady(result)]

    def _remove_pairwise_masks(self, dropped: int, total: npt.NDArray[np.uint32]) -> None:
        """Subtract what the survivors added for their pairs with a node that dropped."""
        books = self._books
        private = KeyPair.from_private(self._rebuild(books.key_shares[dropped]))
        if private.public != books.keys[dropped].mask:
            raise SecurityError(f"the rebuilt mask key of {self.clients[dropped]} is wrong")
        for survivor in sorted(self.graph[dropped] & books.masked):
            seed = agree(private, books.keys[survivor].mask, self._context, Purpose.MASK)
            mask = expand_mask(seed, self.session.masked_length)
            if survivor < dropped:
                total -= mask
            else:
                total += mask

    def _rebuild(self, shares: Mapping[int, npt.NDArray[np.int64]]) -> bytes:
        holders = sorted(shares)[: self.session.threshold]
        limbs = reconstruct(holders, np.stack([shares[holder] for holder in holders]))
        try:
            return field_to_bytes(limbs, length=2 * len(limbs))
        except ProtocolError as exc:
            raise SecurityError(f"a secret did not reconstruct: {exc}") from exc
