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

It plays the actively secure variant (see :mod:`shoal.secure.consistency`):
it checks each advertisement against the client's enrolled identity, sends
the survivor set to be signed and forwards each client its neighbours'
signatures before the unmask stage, and checks every revealed share and
rebuilt secret (:mod:`shoal.secure.unmasking`). A client caught cheating is
named in the outcome's ``culprits``: the sum is exact without it, or the
round aborts.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Final

from shoal.core.errors import IllegalTransition, ProtocolError, SecurityError
from shoal.core.sharing import graph_degree, minimum_threshold
from shoal.secure.crypto import SessionContext
from shoal.secure.graph import Graph, neighbour_graph
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    ClientMessage,
    KeysAdvertised,
    MaskedInput,
    SessionConfig,
    SharesSent,
    Stage,
    StaleMessage,
    SurvivorsSigned,
    UnmaskShares,
)
from shoal.secure.server_books import Books, stage_requests
from shoal.secure.server_events import (
    Aborted,
    ClientDropped,
    MessageReceived,
    ScheduleStageDeadline,
    SecureSum,
    SendRequest,
    ServerAction,
    ServerEvent,
    StageDeadline,
    StageDeadlines,
    SumReady,
)
from shoal.secure.unmasking import DealerCheated, ShareLedger, remove_masks

__all__ = [
    "SERVER_TRANSITIONS",
    "STAGES",
    "Aborted",
    "ClientDropped",
    "MessageReceived",
    "ScheduleStageDeadline",
    "SecAggServer",
    "SecureSum",
    "SendRequest",
    "ServerAction",
    "ServerEvent",
    "StageDeadline",
    "StageDeadlines",
    "Step",
    "SumReady",
]

log = logging.getLogger("shoal.secure")

_UNMASK_SPARE = 1  # holders beyond the threshold before the masked-input stage closes early
STAGES = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY,
    Stage.UNMASK,
)


class Step(enum.Enum):
    """The server's own steps, which move it without an outside event."""

    STAGE_CLOSED = "stage closed"
    TOO_FEW_SURVIVORS = "too few survivors"


_S = Stage
_MESSAGE_OF_STAGE: Final[Mapping[Stage, type[ClientMessage]]] = {
    _S.ADVERTISE_KEYS: KeysAdvertised,
    _S.SHARE_KEYS: SharesSent,
    _S.MASKED_INPUT: MaskedInput,
    _S.CONSISTENCY: SurvivorsSigned,
    _S.UNMASK: UnmaskShares,
}

Trigger = type[ClientMessage] | type[StageDeadline] | type[ClientDropped] | Step

SERVER_TRANSITIONS: Final[Mapping[tuple[Stage, Trigger], Stage]] = {
    # each stage takes its own message, deadlines and drop reports until it closes
    (_S.ADVERTISE_KEYS, KeysAdvertised): _S.ADVERTISE_KEYS,
    (_S.SHARE_KEYS, SharesSent): _S.SHARE_KEYS,
    (_S.MASKED_INPUT, MaskedInput): _S.MASKED_INPUT,
    (_S.CONSISTENCY, SurvivorsSigned): _S.CONSISTENCY,
    (_S.UNMASK, UnmaskShares): _S.UNMASK,
    **{(stage, StageDeadline): stage for stage in STAGES},
    **{(stage, ClientDropped): stage for stage in STAGES},
    (_S.ADVERTISE_KEYS, Step.STAGE_CLOSED): _S.SHARE_KEYS,
    (_S.SHARE_KEYS, Step.STAGE_CLOSED): _S.MASKED_INPUT,
    (_S.MASKED_INPUT, Step.STAGE_CLOSED): _S.CONSISTENCY,
    (_S.CONSISTENCY, Step.STAGE_CLOSED): _S.UNMASK,
    (_S.UNMASK, Step.STAGE_CLOSED): _S.FINISHED,
    **{(stage, Step.TOO_FEW_SURVIVORS): _S.ABORTED for stage in STAGES},
    # once over, stale timers and drop reports change nothing
    (_S.FINISHED, StageDeadline): _S.FINISHED,
    (_S.FINISHED, ClientDropped): _S.FINISHED,
    (_S.ABORTED, StageDeadline): _S.ABORTED,
    (_S.ABORTED, ClientDropped): _S.ABORTED,
}


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
        identities: Mapping[str, bytes],
        target: int | None = None,
    ) -> None:
        if len(client_ids) != session.num_nodes or len(set(client_ids)) != len(client_ids):
            raise ProtocolError("the session needs one distinct client per node")
        unknown = [client for client in client_ids if client not in identities]
        if unknown:
            raise ProtocolError(f"clients {unknown[:3]} have no identity key to sign with")
        floor = minimum_threshold(graph_degree(session.num_nodes, degree))
        if session.threshold < floor:
            raise ProtocolError(
                f"threshold {session.threshold} is below the safe floor {floor} of this graph"
            )
        self.session = session
        self.deadlines = deadlines
        self.min_survivors = max(min_survivors, session.threshold)
        self.target = session.num_nodes if target is None else target
        self.stage = Stage.ADVERTISE_KEYS
        self.nodes: dict[str, int] = {client: i for i, client in enumerate(client_ids, start=1)}
        self.clients: dict[int, str] = {i: client for client, i in self.nodes.items()}
        self.graph: Graph = neighbour_graph(session.num_nodes, degree=degree, seed=graph_seed)
        self._books = Books(ledger=ShareLedger(names=self.clients))
        self._context = SessionContext(run_id=session.run_id, round=session.round)
        self._identities = {self.nodes[client]: identities[client] for client in client_ids}
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
        return set(self._waited(self.stage)) - self._books.gone

    def _waited(self, stage: Stage) -> AbstractSet[int]:
        """The nodes ``stage`` waits for, those gone included: the books' own sets, not copies
        (the server asks for every message)."""
        books = self._books
        match stage:
            case Stage.ADVERTISE_KEYS:
                return self.clients.keys()
            case Stage.SHARE_KEYS:
                return books.keys.keys()
            case Stage.MASKED_INPUT:
                return books.shared
            case Stage.CONSISTENCY:
                return books.masked
            case Stage.UNMASK:
                return books.signed.keys()
        return frozenset()

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
        books = self._books
        if node not in self._waited(self.stage) or node in books.gone or node in self._answered():
            raise ProtocolError(
                f"{event.client_id} is not expected at {self.stage.label} "
                "(it answered already, dropped before, or was never asked)"
            )
        try:
            match event.message:
                case KeysAdvertised():
                    identity = self._identities[node]
                    books.take_keys(node, event.message, context=self._context, identity=identity)
                case SharesSent():
                    books.take_shares(node, event.message, neighbours=self.graph[node])
                case MaskedInput():
                    self._take_masked_input(node, event.message)
                case SurvivorsSigned():
                    books.take_signature(node, event.message.signature)
                case UnmaskShares():
                    graph, context = self.graph, self._context
                    books.take_unmask_shares(node, event.message, context=context, graph=graph)
        except (ProtocolError, SecurityError) as exc:
            raise type(exc)(f"{event.client_id} refused at {self.stage.label}: {exc}") from None
        return self._close(event.now) if self._stage_complete() else []

    def _take_masked_input(self, node: int, message: MaskedInput) -> None:
        self._books.take_masked_input(node, message, length=self.session.masked_length)

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
        waited, answered = self._waited(self.stage), self._answered()
        if len(waited) > len(answered) + len(books.gone):
            return False  # someone is neither in nor gone: no need to look for whom
        return not (waited - books.gone - answered)

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

    def _answered(self) -> AbstractSet[int]:
        """The nodes that answered the current stage (the books' own sets, not copies)."""
        books = self._books
        match self.stage:
            case Stage.ADVERTISE_KEYS:
                return books.keys.keys()
            case Stage.SHARE_KEYS:
                return books.shared
            case Stage.MASKED_INPUT:
                return books.masked
            case Stage.CONSISTENCY:
                return books.signed.keys()
            case Stage.UNMASK:
                return books.unmasked
        return frozenset()

    # --- closing stages --------------------------------------------------------------------

    def _close(self, now: float) -> list[ServerAction]:
        stage, books = self.stage, self._books
        if stage is Stage.ADVERTISE_KEYS:
            self._prune_isolated()
        survivors = self._answered()
        missing = set(self._waited(stage)) - survivors
        if stage is Stage.UNMASK and self._enough_shares():
            missing &= books.gone  # the rest were simply not needed any more
        books.dropped[stage.label] = len(missing)
        if stage is Stage.UNMASK:
            return self._finish()
        # the signers need only reveal shares; every other stage keeps the round's quorum
        needed = self.session.threshold if stage is Stage.CONSISTENCY else self.min_survivors
        if len(survivors) < needed:
            return self._abort(
                f"{len(survivors)} clients left after {stage.label}, fewer than the {needed} needed"
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
        requests = stage_requests(
            self.stage,
            self._books,
            graph=self.graph,
            identities=self._identities,
            round_number=self.session.round,
        )
        return [SendRequest(self.clients[node], request) for node, request in requests.items()]

    def _deadline(self, now: float) -> ScheduleStageDeadline:
        return ScheduleStageDeadline(self.stage, now + self.deadlines.of(self.stage))

    def _abort(self, reason: str) -> list[ServerAction]:
        self.stage = self._next(Step.TOO_FEW_SURVIVORS)
        self._books.total = None
        log.warning("secure round %d aborted: %s", self.session.round, reason)
        return [Aborted(reason, dict(self._books.dropped), self._culprits())]

    def _culprits(self) -> dict[str, str]:
        return {self.clients[node]: what for node, what in self._books.ledger.culprits.items()}

    # --- unmasking -----------------------------------------------------------------------------

    def _enough_shares(self) -> bool:
        books = self._books
        return books.ledger.enough(
            masked=books.masked,
            dropped=books.shared - books.masked,
            threshold=self.session.threshold,
        )

    def _finish(self) -> list[ServerAction]:
        books = self._books
        if books.total is None or not self._enough_shares():
            return self._abort("too few unmask shares arrived to remove the masks")
        total = books.total
        try:
            remove_masks(
                total,
                books.ledger,
                masked=books.masked,
                dropped=books.shared - books.masked,
                adverts=books.keys,
                graph=self.graph,
                context=self._context,
                threshold=self.session.threshold,
            )
        except DealerCheated as exc:
            books.ledger.culprits.setdefault(exc.node, exc.reason)
            return self._abort(f"{self.clients[exc.node]} {exc.reason}")
        except SecurityError as exc:
            return self._abort(str(exc))
        decoded = self.session.quantization.decode(total, count=len(books.masked))
        books.total = None
        self.stage = self._next(Step.STAGE_CLOSED)
        culprits = self._culprits()
        if culprits:
            log.warning("secure round %d caught cheating: %s", self.session.round, culprits)
        result = SecureSum(
            decoded=decoded,
            contributors=tuple(self.clients[node] for node in sorted(books.masked)),
            recovered=tuple(self.clients[node] for node in sorted(books.shared - books.masked)),
            dropped=dict(books.dropped),
            culprits=culprits,
        )
        return [SumReady(result)]
