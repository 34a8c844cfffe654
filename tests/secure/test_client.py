"""The SecAgg+ client: every illegal transition raises and changes nothing; bad requests refused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shoal.core import IllegalTransition, ProtocolError, SecurityError
from shoal.secure.client import CLIENT_TRANSITIONS, ClientStage, Contribution, SecAggClient
from shoal.secure.consistency import IdentityKey
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    Advertisement,
    ConsistencyRequest,
    KeysAdvertised,
    MaskedInput,
    MaskedInputRequest,
    PeerKeys,
    PublicKeys,
    ServerRequest,
    SessionConfig,
    ShareKeysRequest,
    SharesSent,
    StaleMessage,
    SurvivorsSigned,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.quantization import Quantization

SESSION = SessionConfig(
    "run", 2, num_nodes=3, vector_length=4, threshold=2, quantization=Quantization()
)
CONTRIBUTION = Contribution(np.ones(4, np.float32), num_examples=5, loss=0.1)


IDENTITIES = {node: IdentityKey.generate() for node in (1, 2, 3)}
ALL = frozenset({1, 2, 3})
Inboxes = dict[int, tuple[dict[int, bytes], dict[int, bytes]]]  # node: (sealed, digests)


def _trio() -> dict[int, SecAggClient]:
    return {
        node: SecAggClient(round=2, identity=IDENTITIES[node], rng=np.random.default_rng(node))
        for node in (1, 2, 3)
    }


def _advertise(clients: dict[int, SecAggClient]) -> dict[int, Advertisement]:
    adverts = {}
    for node, client in clients.items():
        neighbours = frozenset({1, 2, 3} - {node})
        reply = client.handle(AdvertiseKeysRequest(2, SESSION, node, neighbours))
        assert isinstance(reply, KeysAdvertised)
        adverts[node] = reply.advertisement
    return adverts


def _peers(adverts: dict[int, Advertisement], node: int) -> dict[int, PeerKeys]:
    return {
        peer: PeerKeys(IDENTITIES[peer].public, advert)
        for peer, advert in adverts.items()
        if peer != node
    }


def _share(clients: dict[int, SecAggClient], adverts: dict[int, Advertisement]) -> Inboxes:
    inboxes: Inboxes = {node: ({}, {}) for node in clients}
    for node, client in clients.items():
        reply = client.handle(ShareKeysRequest(2, _peers(adverts, node)))
        assert isinstance(reply, SharesSent)
        for receiver, sealed in reply.sealed_shares.items():
            inboxes[receiver][0][node] = sealed
            inboxes[receiver][1][node] = reply.share_digests[receiver]
    return inboxes


def _masked_request(inboxes: Inboxes, node: int) -> MaskedInputRequest:
    return MaskedInputRequest(2, *inboxes[node])


def _requests(stage: ClientStage) -> ServerRequest:
    return {
        ClientStage.READY: AdvertiseKeysRequest(2, SESSION, 1, frozenset({2, 3})),
        ClientStage.KEYS_ADVERTISED: ShareKeysRequest(2, {}),
        ClientStage.KEYS_SHARED: MaskedInputRequest(2, {}, {}),
        ClientStage.INPUT_MASKED: ConsistencyRequest(2, ALL),
        ClientStage.SURVIVORS_SIGNED: UnmaskRequest(2, {}),
    }.get(stage, UnmaskRequest(2, {}))


def _walk(
    stage: ClientStage,
) -> tuple[dict[int, SecAggClient], dict[int, bytes]]:
    """The trio walked to ``stage``, and the survivor-set signatures if they signed."""
    clients = _trio()
    if stage is ClientStage.READY:
        return clients, {}
    adverts = _advertise(clients)
    if stage is ClientStage.KEYS_ADVERTISED:
        return clients, {}
    inboxes = _share(clients, adverts)
    if stage is ClientStage.KEYS_SHARED:
        return clients, {}
    for node, client in clients.items():
        client.handle(_masked_request(inboxes, node), CONTRIBUTION)
    if stage is ClientStage.INPUT_MASKED:
        return clients, {}
    signatures = {}
    for node, client in clients.items():
        reply = client.handle(ConsistencyRequest(2, ALL))
        assert isinstance(reply, SurvivorsSigned)
        signatures[node] = reply.signature
    if stage is ClientStage.SURVIVORS_SIGNED:
        return clients, signatures
    clients[1].handle(UnmaskRequest(2, {2: signatures[2], 3: signatures[3]}))
    return clients, signatures


def _client_at(stage: ClientStage) -> SecAggClient:
    """A client (node 1 of a trio) walked to ``stage``."""
    return _walk(stage)[0][1]


REQUEST_TYPES = [
    AdvertiseKeysRequest,
    ShareKeysRequest,
    MaskedInputRequest,
    ConsistencyRequest,
    UnmaskRequest,
]


@pytest.mark.parametrize(
    ("stage", "request_type"),
    [
        (stage, kind)
        for stage, kind in itertools.product(ClientStage, REQUEST_TYPES)
        if (stage, kind) not in CLIENT_TRANSITIONS
    ],
)
def test_every_illegal_transition_raises_and_changes_nothing(
    stage: ClientStage, request_type: type[ServerRequest]
) -> None:
    client = _client_at(stage)
    request = next(_requests(s) for s in [*ClientStage] if isinstance(_requests(s), request_type))
    with pytest.raises(IllegalTransition, match="not allowed while the client is"):
        client.handle(request, CONTRIBUTION)
    assert client.stage is stage


def test_the_legal_path_walks_every_stage() -> None:
    assert _client_at(ClientStage.UNMASKED).stage is ClientStage.UNMASKED
    assert len(CLIENT_TRANSITIONS) == 5


def test_a_request_of_another_round_is_stale() -> None:
    client = _client_at(ClientStage.READY)
    other = SessionConfig("run", 1, 3, 4, 2, Quantization())
    with pytest.raises(StaleMessage, match="round 1"):
        client.handle(AdvertiseKeysRequest(1, other, 1, frozenset({2, 3})))
    assert client.stage is ClientStage.READY


def test_masked_inputs_hide_the_input_and_sum_to_it_with_the_self_masks() -> None:
    clients = _trio()
    inboxes = _share(clients, _advertise(clients))
    replies = [
        client.handle(_masked_request(inboxes, node), CONTRIBUTION)
        for node, client in clients.items()
    ]
    assert all(isinstance(reply, MaskedInput) for reply in replies)
    vectors = [reply.vector for reply in replies if isinstance(reply, MaskedInput)]
    quantized = Quantization().encode(
        CONTRIBUTION.update, num_examples=5, loss=0.1, rng=np.random.default_rng(0)
    )
    assert not any(np.array_equal(vector[:4], quantized[:4]) for vector in vectors)


def test_refusals_leave_the_stage_unchanged() -> None:
    client = _client_at(ClientStage.READY)
    lonely = SessionConfig("run", 2, 3, 4, threshold=3, quantization=Quantization())
    with pytest.raises(ProtocolError, match="cannot hold"):
        client.handle(AdvertiseKeysRequest(2, lonely, 1, frozenset({2})))
    assert client.stage is ClientStage.READY

    client = _client_at(ClientStage.KEYS_ADVERTISED)
    stranger = Advertisement(
        PublicKeys(bytes(range(32)), bytes(range(1, 33))), bytes(32), bytes(64)
    )
    with pytest.raises(ProtocolError, match="not my neighbours"):
        client.handle(ShareKeysRequest(2, {7: PeerKeys(bytes(32), stranger)}))
    assert client.stage is ClientStage.KEYS_ADVERTISED

    client = _client_at(ClientStage.KEYS_SHARED)
    with pytest.raises(ProtocolError, match="contribution"):
        client.handle(MaskedInputRequest(2, {}, {}))
    with pytest.raises(ProtocolError, match="never received"):
        client.handle(MaskedInputRequest(2, {9: b"x" * 60}, {9: bytes(64)}), CONTRIBUTION)
    wrong = Contribution(np.ones(5, np.float32), 1)
    with pytest.raises(ProtocolError, match="shape"):
        client.handle(MaskedInputRequest(2, {}, {}), wrong)
    assert client.stage is ClientStage.KEYS_SHARED

    client = _client_at(ClientStage.INPUT_MASKED)
    with pytest.raises(ProtocolError, match="must list this client"):
        client.handle(ConsistencyRequest(2, frozenset({2, 3})))
    with pytest.raises(ProtocolError, match="does not fit"):
        client.handle(ConsistencyRequest(2, frozenset({1})))  # fewer than the threshold
    with pytest.raises(ProtocolError, match="does not fit"):
        client.handle(ConsistencyRequest(2, frozenset({1, 2, 9})))
    assert client.stage is ClientStage.INPUT_MASKED


def test_shares_are_revealed_only_for_the_set_signed_and_by_enough_signers() -> None:
    clients, signatures = _walk(ClientStage.SURVIVORS_SIGNED)
    client = clients[1]
    with pytest.raises(SecurityError, match="only 1 valid signatures"):
        client.handle(UnmaskRequest(2, {}))
    with pytest.raises(SecurityError, match="only 1 valid"):
        client.handle(UnmaskRequest(2, {2: signatures[3], 3: bytes(64)}))  # not theirs
    assert client.stage is ClientStage.SURVIVORS_SIGNED
    reply = client.handle(UnmaskRequest(2, {2: signatures[2]}))  # t = 2: mine and one more
    assert isinstance(reply, UnmaskShares)
    assert set(reply.seed_shares) == ALL and not reply.key_shares


def test_a_set_without_a_neighbour_reveals_its_mask_key_never_its_seed() -> None:
    clients, _ = _walk(ClientStage.INPUT_MASKED)
    survivors = frozenset({1, 2})  # the server says node 3 dropped
    signatures = {}
    for node in (1, 2):
        reply = clients[node].handle(ConsistencyRequest(2, survivors))
        assert isinstance(reply, SurvivorsSigned)
        signatures[node] = reply.signature
    reply = clients[1].handle(UnmaskRequest(2, {2: signatures[2]}))
    assert isinstance(reply, UnmaskShares)
    assert set(reply.seed_shares) == {1, 2} and set(reply.key_shares) == {3}
    with pytest.raises(IllegalTransition):  # once per round
        clients[1].handle(UnmaskRequest(2, {2: signatures[2]}))


def test_a_client_signs_one_survivor_set_per_round() -> None:
    client = _client_at(ClientStage.INPUT_MASKED)
    client.handle(ConsistencyRequest(2, ALL))
    with pytest.raises(IllegalTransition):
        client.handle(ConsistencyRequest(2, frozenset({1, 2})))
    assert client.stage is ClientStage.SURVIVORS_SIGNED


def test_swapped_keys_and_a_share_that_misses_its_digest_are_refused() -> None:
    clients = _trio()
    adverts = _advertise(clients)
    peers = _peers(adverts, 1)
    forged = Advertisement(adverts[3].keys, adverts[2].seed_commitment, adverts[2].signature)
    with pytest.raises(SecurityError, match="node 2 carry no valid signature"):
        clients[1].handle(ShareKeysRequest(2, {**peers, 2: PeerKeys(peers[2].identity, forged)}))
    assert clients[1].stage is ClientStage.KEYS_ADVERTISED
    twice = {**peers, 3: PeerKeys(peers[2].identity, adverts[3])}
    with pytest.raises(SecurityError, match="share an identity key"):
        clients[1].handle(ShareKeysRequest(2, twice))
    inboxes = _share(clients, adverts)
    sealed, digests = inboxes[1]
    with pytest.raises(SecurityError, match="does not match the digest"):
        clients[1].handle(MaskedInputRequest(2, sealed, {**digests, 2: bytes(64)}), CONTRIBUTION)
    assert clients[1].stage is ClientStage.KEYS_SHARED


def test_a_tampered_share_is_detected() -> None:
    clients = _trio()
    inboxes = _share(clients, _advertise(clients))
    shares, digests = inboxes[1]
    sealed = bytearray(shares[2])
    sealed[20] ^= 0xFF
    with pytest.raises(SecurityError, match="failed authentication"):
        clients[1].handle(
            MaskedInputRequest(2, {**shares, 2: bytes(sealed)}, digests), CONTRIBUTION
        )
    assert clients[1].stage is ClientStage.KEYS_SHARED
    # a share sealed for another receiver does not open here either
    with pytest.raises(SecurityError):
        clients[1].handle(
            MaskedInputRequest(2, {2: inboxes[3][0][2]}, {2: inboxes[3][1][2]}), CONTRIBUTION
        )
