"""One secure round with every party in this process: for tests, benchmarks and rehearsals.

The server and the clients exchange their messages through plain function
calls. Clients can be told to vanish before a given stage (never answering
its request), which exercises the dropout paths; the stage then closes at its
deadline, as it would on a network. Each client signs with a key made for
the round, whose public half the server is given (the loopback's PKI). The
wall time each side spends is measured separately, so a benchmark can
report client and server compute.

>>> outcome = run_loopback_round(contributions, degree=7, dropouts={"c3": Stage.MASKED_INPUT})
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from shoal.core.errors import ProtocolError, SecurityError
from shoal.core.sharing import reconstruction_threshold
from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.consistency import IdentityKey
from shoal.secure.messages import ClientMessage, SessionConfig, SharesSent, Stage, UnmaskShares
from shoal.secure.quantization import Quantization
from shoal.secure.serde import message_size
from shoal.secure.server import (
    Aborted,
    MessageReceived,
    ScheduleStageDeadline,
    SecAggServer,
    SendRequest,
    ServerAction,
    StageDeadline,
    StageDeadlines,
    SumReady,
)


@dataclass(slots=True)
class LoopbackOutcome:
    """What a loopback round produced, and what it cost."""

    result: SumReady | Aborted
    client_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    bytes_sent: dict[str, int] = field(default_factory=dict)  # by client: its replies
    bytes_received: dict[str, int] = field(default_factory=dict)  # by client: its requests
    closed_at: dict[str, float] = field(default_factory=dict)  # virtual time each stage closed


__all__ = ["LoopbackOutcome", "altered_reveal", "reconstruction_threshold", "run_loopback_round"]


def run_loopback_round(
    contributions: Mapping[str, Contribution],
    *,
    degree: int,
    quantization: Quantization | None = None,
    dropouts: Mapping[str, Stage] | None = None,
    min_survivors: int = 1,
    deadlines: StageDeadlines | None = None,
    run_id: str = "loopback",
    round_number: int = 1,
    seed: int = 0,
    tamper: Sequence[str] = (),
    cheats: Sequence[str] = (),
    identities: Mapping[str, IdentityKey] | None = None,
) -> LoopbackOutcome:
    """Run one round; a client in ``dropouts`` never answers that stage's request or later ones.

    ``tamper`` names clients whose first sealed share is corrupted in transit;
    ``cheats`` names dishonest clients that add 1 to one limb of the first share
    they reveal. ``identities`` are the clients' signing keys (made for the
    round when not given: enrollment is not a round's cost, so a benchmark
    gives them).
    """
    client_ids = sorted(contributions)
    if not client_ids:
        raise ProtocolError("a secure round needs at least one client")
    if identities is None:
        identities = {client: IdentityKey.generate() for client in client_ids}
    if quantization is None:
        quantization = Quantization().fitted(len(client_ids))
    vector_length = next(iter(contributions.values())).update.size
    session = SessionConfig(
        run_id=run_id,
        round=round_number,
        num_nodes=len(client_ids),
        vector_length=vector_length,
        threshold=reconstruction_threshold(degree=degree, num_nodes=len(client_ids)),
        quantization=quantization,
    )
    server = SecAggServer(
        session,
        client_ids,
        degree=degree,
        graph_seed=f"{run_id}/{round_number}/{seed}".encode(),
        deadlines=deadlines if deadlines is not None else StageDeadlines(),
        min_survivors=min_survivors,
        identities={client: identity.public for client, identity in identities.items()},
    )
    clients = {
        client: SecAggClient(
            round=round_number,
            identity=identities[client],
            rng=np.random.default_rng([seed, index]),
        )
        for index, client in enumerate(client_ids)
    }
    outcome = LoopbackOutcome(result=Aborted("not finished", {}))
    outcome.client_seconds = dict.fromkeys(client_ids, 0.0)
    outcome.bytes_sent = dict.fromkeys(client_ids, 0)
    outcome.bytes_received = dict.fromkeys(client_ids, 0)
    dropouts = dict(dropouts or {})
    clock = _Clock(outcome)
    pending = clock.server(server.start, 0.0)
    while True:
        ending = next(
            a for a in pending if isinstance(a, ScheduleStageDeadline | SumReady | Aborted)
        )
        if not isinstance(ending, ScheduleStageDeadline):
            outcome.result = ending
            return outcome
        stage, arrival = ending.stage, clock.now + _LATENCY_S
        requests, pending = pending, []
        for action in requests:
            if not isinstance(action, SendRequest):
                continue
            # every client asked answers; the server takes each reply as it comes, so that
            # no more than one masked vector is held at a time, as on a network
            reply = _answer(clients, contributions, dropouts, action, outcome)
            if reply is not None and action.client_id in tamper:
                reply = _tampered(reply)
            if reply is not None and action.client_id in cheats:
                reply = altered_reveal(reply, node=server.nodes[action.client_id])
            if reply is not None and server.stage is stage:  # once it closes early, no more
                outcome.bytes_sent[action.client_id] += message_size(reply)
                event = MessageReceived(action.client_id, reply, arrival)
                pending += clock.server(server.handle, event)
        clock.now = arrival
        if server.stage is stage:  # someone stalled: the stage closes at its deadline
            clock.now = ending.at
            pending = clock.server(server.handle, StageDeadline(stage, ending.at))
        outcome.closed_at[stage.label] = clock.now


_T = TypeVar("_T")
_LATENCY_S = 0.05  # the loopback's message delay, in virtual seconds


class _Clock:
    """Virtual time, and the wall time the server spends."""

    def __init__(self, outcome: LoopbackOutcome) -> None:
        self.now = 0.0
        self._outcome = outcome

    def server(self, call: Callable[[_T], list[ServerAction]], argument: _T) -> list[ServerAction]:
        began = time.perf_counter()
        actions = call(argument)
        self._outcome.server_seconds += time.perf_counter() - began
        return actions


def _answer(
    clients: Mapping[str, SecAggClient],
    contributions: Mapping[str, Contribution],
    dropouts: Mapping[str, Stage],
    action: SendRequest,
    outcome: LoopbackOutcome,
) -> ClientMessage | None:
    """The client's reply, or None when it is gone or refused the request."""
    client, request = action.client_id, action.request
    outcome.bytes_received[client] += message_size(request)
    stage = dropouts.get(client)
    if stage is not None and request.stage >= stage:
        return None
    began = time.perf_counter()
    try:
        reply = clients[client].handle(request, contributions[client])
    except SecurityError:
        return None  # it found a tampered share and left the round
    finally:
        outcome.client_seconds[client] += time.perf_counter() - began
    return reply


def _tampered(reply: ClientMessage) -> ClientMessage:
    if not isinstance(reply, SharesSent) or not reply.sealed_shares:
        return reply
    receiver = min(reply.sealed_shares)
    sealed = bytearray(reply.sealed_shares[receiver])
    sealed[-1] ^= 0x01
    sealed_shares = {**reply.sealed_shares, receiver: bytes(sealed)}
    return SharesSent(reply.round, sealed_shares, reply.share_digests)


def altered_reveal(reply: ClientMessage, *, node: int) -> ClientMessage:
    """A dishonest client's unmask reply: 1 added to the first limb of the first share it
    reveals of another node's secret (``node`` is its own)."""
    if not isinstance(reply, UnmaskShares):
        return reply
    seeds, keys = dict(reply.seed_shares), dict(reply.key_shares)
    book = keys if keys else seeds
    owner = min(set(book) - {node}, default=node)
    limbs = np.frombuffer(book[owner], dtype="<u4").copy()
    limbs[0] += 1
    book[owner] = limbs.tobytes()
    return UnmaskShares(reply.round, seeds, keys)
