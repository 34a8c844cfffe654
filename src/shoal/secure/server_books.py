"""What the SecAgg+ server knows about each node, and each stage's requests built from it.

:class:`Books` takes the clients' replies, checking each against what the
server asked for (a bad one raises and changes nothing), and
:func:`stage_requests` builds every node's request for the stage the server
opens. The state machine that decides when stages open and close is
:class:`shoal.secure.server.SecAggServer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ProtocolError, SecurityError
from shoal.secure.consistency import Verifier, advertisement_message
from shoal.secure.crypto import SessionContext
from shoal.secure.messages import (
    Advertisement,
    ConsistencyRequest,
    KeysAdvertised,
    MaskedInput,
    MaskedInputRequest,
    PeerKeys,
    ServerRequest,
    ShareKeysRequest,
    SharesSent,
    Stage,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.unmasking import ShareLedger

Graph = Mapping[int, frozenset[int]]


@dataclass(slots=True)
class Books:
    """What the server knows about each node (U1 to U5 as in Bonawitz et al.)."""

    keys: dict[int, Advertisement] = field(default_factory=dict)  # U1, signed
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender
    digests: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender
    shared: set[int] = field(default_factory=set)  # U2
    masked: set[int] = field(default_factory=set)  # U3
    total: npt.NDArray[np.uint32] | None = None
    signed: dict[int, bytes] = field(default_factory=dict)  # U4: signatures over U3
    ledger: ShareLedger = field(default_factory=ShareLedger)
    unmasked: set[int] = field(default_factory=set)  # U5
    gone: set[int] = field(default_factory=set)  # reported dropped by the shell
    dropped: dict[str, int] = field(default_factory=dict)

    def take_keys(
        self, node: int, message: KeysAdvertised, *, context: SessionContext, identity: bytes
    ) -> None:
        """Keep ``node``'s keys if its enrolled ``identity`` signed them."""
        advertisement = message.advertisement
        signed = advertisement_message(
            context,
            node,
            cipher=advertisement.keys.cipher,
            mask=advertisement.keys.mask,
            seed_commitment=advertisement.seed_commitment,
        )
        if not Verifier(identity).verify(advertisement.signature, signed):
            raise SecurityError("its keys carry no valid signature of its own identity")
        self.keys[node] = advertisement

    def take_shares(self, node: int, message: SharesSent, *, neighbours: frozenset[int]) -> None:
        expected = {node for node in neighbours if node in self.keys}  # O(degree), not O(n)
        if set(message.sealed_shares) != expected:
            raise ProtocolError(
                f"it sent shares for {sorted(message.sealed_shares)}, "
                f"expected one for each of {sorted(expected)}"
            )
        for receiver, sealed in message.sealed_shares.items():
            self.routed.setdefault(receiver, {})[node] = sealed
            self.digests.setdefault(receiver, {})[node] = message.share_digests[receiver]
        self.shared.add(node)

    def take_masked_input(self, node: int, message: MaskedInput, *, length: int) -> None:
        if message.vector.size != length:
            raise ProtocolError(f"it sent {message.vector.size} masked values, expected {length}")
        if self.total is None:
            self.total = message.vector.copy()
        else:
            np.add(self.total, message.vector, out=self.total)  # wraps modulo 2^32
        self.masked.add(node)

    def take_signature(self, node: int, signature: bytes) -> None:
        # not checked here: each client checks its neighbours' signatures, and a bad one only
        # fails to count there; checking them twice would double the stage's cost
        self.signed[node] = signature

    def take_unmask_shares(
        self, node: int, message: UnmaskShares, *, context: SessionContext, graph: Graph
    ) -> None:
        asked_seeds, asked_keys = self.unmask_lists(node, graph)
        if set(message.seed_shares) != asked_seeds or set(message.key_shares) != asked_keys:
            raise ProtocolError("it answered another unmask request")
        self.ledger.take(
            context,
            node,
            seed_shares=message.seed_shares,
            key_shares=message.key_shares,
            digests=self.digests.get(node, {}),
        )
        self.unmasked.add(node)

    def unmask_lists(self, node: int, graph: Graph) -> tuple[frozenset[int], frozenset[int]]:
        """Whose seed shares and whose key shares ``node`` must reveal."""
        peers = graph[node] & self.shared
        return (peers & self.masked) | {node}, peers - self.masked


def stage_requests(
    stage: Stage,
    books: Books,
    *,
    graph: Graph,
    identities: Mapping[int, bytes],
    round_number: int,
) -> dict[int, ServerRequest]:
    """Every node's request as ``stage`` opens, by node."""
    requests: dict[int, ServerRequest] = {}
    if stage is Stage.SHARE_KEYS:
        advertised = frozenset(books.keys)  # once, not once per node
        for node in sorted(advertised):
            peers = {
                peer: PeerKeys(identities[peer], books.keys[peer])
                for peer in sorted(graph[node] & advertised)
            }
            requests[node] = ShareKeysRequest(round_number, peers)
    elif stage is Stage.MASKED_INPUT:
        for node in sorted(books.shared):
            senders = sorted(set(books.routed.get(node, {})) & books.shared)
            inbox = {sender: books.routed[node][sender] for sender in senders}
            digests = {sender: books.digests[node][sender] for sender in senders}
            requests[node] = MaskedInputRequest(round_number, inbox, digests)
    elif stage is Stage.CONSISTENCY:
        survivors = frozenset(books.masked)
        request = ConsistencyRequest(round_number, survivors)  # the same for all: checked once
        for node in sorted(survivors):
            requests[node] = request
    elif stage is Stage.UNMASK:
        signed = frozenset(books.signed)
        for node in sorted(signed):
            signers = sorted(graph[node] & signed)
            signatures = {signer: books.signed[signer] for signer in signers}
            requests[node] = UnmaskRequest(round_number, signatures)
    return requests
