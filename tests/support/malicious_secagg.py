"""A malicious SecAgg+ server for attack tests: it drives honest clients with forged requests.

The harness runs the real :class:`SecAggClient` machines through the
honest first stages, then lies in the consistency and unmask stages: each
client is shown the survivor set the attack assigns it, and is forwarded
every signature its neighbours gave, valid or not for that set. Whatever
the clients reveal is kept, and :meth:`MaliciousServer.recover` tries to
rebuild every mask of a target client from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ProtocolError, SecurityError
from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.consistency import IdentityKey
from shoal.secure.crypto import KeyPair, Purpose, SessionContext, agree, expand_mask
from shoal.secure.graph import neighbour_graph
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    Advertisement,
    ConsistencyRequest,
    KeysAdvertised,
    MaskedInput,
    MaskedInputRequest,
    PeerKeys,
    SessionConfig,
    ShareKeysRequest,
    SharesSent,
    SurvivorsSigned,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.quantization import Quantization
from shoal.secure.shamir import field_to_bytes, reconstruct
from shoal.secure.unmasking import limbs_from_bytes


@dataclass(slots=True)
class Harvest:
    """What the forged stages got out of the honest clients."""

    seed_shares: dict[int, dict[int, npt.NDArray[np.int64]]] = field(default_factory=dict)
    key_shares: dict[int, dict[int, npt.NDArray[np.int64]]] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)  # client -> why it refused


class MaliciousServer:
    """Runs the honest first three stages over ``num_nodes`` real clients."""

    def __init__(self, num_nodes: int, *, degree: int, threshold: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.nodes = list(range(1, num_nodes + 1))
        self.graph = neighbour_graph(num_nodes, degree=degree, seed=b"attack")
        self.session = SessionConfig(
            "attack", 1, num_nodes, 64, threshold, Quantization().fitted(num_nodes)
        )
        self.context = SessionContext("attack", 1)
        self.identities = {node: IdentityKey.generate() for node in self.nodes}
        self.clients = {
            node: SecAggClient(round=1, identity=self.identities[node]) for node in self.nodes
        }
        self.updates = {node: rng.normal(0, 0.5, 64).astype(np.float32) for node in self.nodes}
        self.adverts: dict[int, Advertisement] = {}
        self.masked: dict[int, npt.NDArray[np.uint32]] = {}
        self._run_honest_stages()

    def _run_honest_stages(self) -> None:
        for node, client in self.clients.items():
            reply = client.handle(AdvertiseKeysRequest(1, self.session, node, self.graph[node]))
            assert isinstance(reply, KeysAdvertised)
            self.adverts[node] = reply.advertisement
        inboxes: dict[int, dict[int, bytes]] = {node: {} for node in self.nodes}
        digests: dict[int, dict[int, bytes]] = {node: {} for node in self.nodes}
        for node, client in self.clients.items():
            peers = {
                peer: PeerKeys(self.identities[peer].public, self.adverts[peer])
                for peer in sorted(self.graph[node])
            }
            shares = client.handle(ShareKeysRequest(1, peers))
            assert isinstance(shares, SharesSent)
            for receiver, sealed in shares.sealed_shares.items():
                inboxes[receiver][node] = sealed
                digests[receiver][node] = shares.share_digests[receiver]
        for node, client in self.clients.items():
            contribution = Contribution(self.updates[node], num_examples=100)
            request = MaskedInputRequest(1, inboxes[node], digests[node])
            masked = client.handle(request, contribution)
            assert isinstance(masked, MaskedInput)
            self.masked[node] = masked.vector

    def attack(self, shown: Mapping[int, frozenset[int]]) -> Harvest:
        """Show each client in ``shown`` its survivor set, then ask it for its shares."""
        harvest, signatures = Harvest(), {}
        for node, survivors in shown.items():
            try:
                reply = self.clients[node].handle(ConsistencyRequest(1, survivors))
            except (ProtocolError, SecurityError) as exc:
                harvest.refused[node] = str(exc)
                continue
            assert isinstance(reply, SurvivorsSigned)
            signatures[node] = reply.signature
        for node in signatures:
            forwarded = {peer: signatures[peer] for peer in self.graph[node] if peer in signatures}
            try:
                reply = self.clients[node].handle(UnmaskRequest(1, forwarded))
            except (ProtocolError, SecurityError) as exc:
                harvest.refused[node] = str(exc)
                continue
            assert isinstance(reply, UnmaskShares)
            for owner, data in reply.seed_shares.items():
                harvest.seed_shares.setdefault(owner, {})[node] = limbs_from_bytes(data)
            for owner, data in reply.key_shares.items():
                harvest.key_shares.setdefault(owner, {})[node] = limbs_from_bytes(data)
        return harvest

    def rebuild(self, shares: Mapping[int, npt.NDArray[np.int64]]) -> bytes | None:
        threshold = self.session.threshold
        if len(shares) < threshold:
            return None
        holders = sorted(shares)[:threshold]
        limbs = reconstruct(holders, np.stack([shares[h] for h in holders]))
        try:
            return field_to_bytes(limbs, length=2 * len(limbs))
        except ProtocolError:
            return None

    def recover(self, target: int, harvest: Harvest) -> npt.NDArray[np.float64] | None:
        """The target's update, if the harvest holds every secret its masks need."""
        length = self.session.masked_length
        seed = self.rebuild(harvest.seed_shares.get(target, {}))
        if seed is None:
            return None
        vector = self.masked[target] - expand_mask(seed, length)
        own_key = self.rebuild(harvest.key_shares.get(target, {}))
        for peer in sorted(self.graph[target]):
            if own_key is not None:
                private, public = own_key, self.adverts[peer].keys.mask
            else:
                peer_key = self.rebuild(harvest.key_shares.get(peer, {}))
                if peer_key is None:
                    return None
                private, public = peer_key, self.adverts[target].keys.mask
            pair = agree(KeyPair.from_private(private), public, self.context, Purpose.MASK)
            mask = expand_mask(pair, length)
            vector = vector - mask if target < peer else vector + mask
        decoded = self.session.quantization.decode(vector.astype(np.uint32), count=1)
        return decoded.weighted_sum / decoded.total_weight


def correlation(a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])
