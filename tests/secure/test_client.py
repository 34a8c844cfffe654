"""The SecAgg+ client: every illegal transition raises and changes nothing; bad requests refused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shoal.core import IllegalTransition, ProtocolError, SecurityError
from shoal.secure.client import CLIENT_TRANSITIONS, ClientStage, Contribution, SecAggClient
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    KeysAdvertised,
    MaskedInput,
    MaskedInputRequest,
    PublicKeys,
    ServerRequest,
    SessionConfig,
    ShareKeysRequest,
    SharesSent,
    StaleMessage,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.quantization import Quantization

SESSION = SessionConfig(
    "run", 2, num_nodes=3, vector_length=4, threshold=2, quantization=Quantization()
)
CONTRIBUTION = Contribution(np.ones(4, np.float32), num_examples=5, loss=0.1)


def _trio() -> dict[int, SecAggClient]:
    return {node: SecAggClient(round=2, rng=np.random.default_rng(node)) for node in (1, 2, 3)}


def _advertise(clients: dict[int, SecAggClient]) -> dict[int, PublicKeys]:
    keys = {}
    for node, client in clients.items():
        neighbours = frozenset({1, 2, 3} - {node})
        reply = client.handle(AdvertiseKeysRequest(2, SESSION, node, neighbours))
        assert isinstance(reply, KeysAdvertised)
        keys[node] = reply.keys
    return keys


def _share(
    clients: dict[int, SecAggClient], keys: dict[int, PublicKeys]
) -> dict[int, dict[int, bytes]]:
    inboxes: dict[int, dict[int, bytes]] = {node: {} for node in clients}
    for node, client in clients.items():
        peers = {peer: keys[peer] for peer in keys if peer != node}
        reply = client.handle(ShareKeysRequest(2, peers))
        assert isinstance(reply, SharesSent)
        for receiver, sealed in reply.sealed_shares.items():
            inboxes[receiver][node] = sealed
    return inboxes


def _requests(stage: ClientStage) -> ServerRequest:
    return {
        ClientStage.READY: AdvertiseKeysRequest(2, SESSION, 1, frozenset({2, 3})),
        ClientStage.KEYS_ADVERTISED: ShareKeysRequest(2, {}),
        ClientStage.KEYS_SHARED: MaskedInputRequest(2, {}),
        ClientStage.INPUT_MASKED: UnmaskRequest(2, frozenset({1}), frozenset()),
    }.get(stage, UnmaskRequest(2, frozenset({1}), frozenset()))


def _client_at(stage: ClientStage) -> SecAggClient:
    """A client (node 1 of a trio) walked to ``stage``."""
    clients = _trio()
    if stage is ClientStage.READY:
        return clients[1]
    keys = _advertise(clients)
    if stage is ClientStage.KEYS_ADVERTISED:
        return clients[1]
    inboxes = _share(clients, keys)
    if stage is ClientStage.KEYS_SHARED:
        return clients[1]
    for node, client in clients.items():
        client.handle(MaskedInputRequest(2, inboxes[node]), CONTRIBUTION)
    if stage is ClientStage.INPUT_MASKED:
        return clients[1]
    clients[1].handle(UnmaskRequest(2, frozenset({1, 2, 3}), frozenset()))
    return clients[1]


REQUEST_TYPES = [AdvertiseKeysRequest, ShareKeysRequest, MaskedInputRequest, UnmaskRequest]


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
    assert len(CLIENT_TRANSITIONS) == 4


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
        client.handle(MaskedInputRequest(2, inboxes[node]), CONTRIBUTION)
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
    stranger = PublicKeys(bytes(range(32)), bytes(range(1, 33)))
    with pytest.raises(ProtocolError, match="not my neighbours"):
        client.handle(ShareKeysRequest(2, {7: stranger}))
    assert client.stage is ClientStage.KEYS_ADVERTISED

    client = _client_at(ClientStage.KEYS_SHARED)
    with pytest.raises(ProtocolError, match="contribution"):
        client.handle(MaskedInputRequest(2, {}))
    with pytest.raises(ProtocolError, match="never received"):
        client.handle(MaskedInputRequest(2, {9: b"x" * 60}), CONTRIBUTION)
    wrong = Contribution(np.ones(5, np.float32), 1)
    with pytest.raises(ProtocolError, match="shape"):
        client.handle(MaskedInputRequest(2, {}), wrong)
    assert client.stage is ClientStage.KEYS_SHARED

    client = _client_at(ClientStage.INPUT_MASKED)
    with pytest.raises(ProtocolError, match="do not hold"):
        client.handle(UnmaskRequest(2, frozenset({1, 9}), frozenset()))
    with pytest.raises(ProtocolError, match="among the survivors"):
        client.handle(UnmaskRequest(2, frozenset({2, 3}), frozenset({1})))
    assert client.stage is ClientStage.INPUT_MASKED
    reply = client.handle(UnmaskRequest(2, frozenset({1, 2}), frozenset({3})))
    assert isinstance(reply, UnmaskShares)
    assert set(reply.seed_shares) == {1, 2} and set(reply.key_shares) == {3}


def test_a_tampered_share_is_detected() -> None:
    clients = _trio()
    inboxes = _share(clients, _advertise(clients))
    sealed = bytearray(inboxes[1][2])
    sealed[20] ^= 0xFF
    with pytest.raises(SecurityError, match="failed authentication"):
        clients[1].handle(MaskedInputRequest(2, {**inboxes[1], 2: bytes(sealed)}), CONTRIBUTION)
    assert clients[1].stage is ClientStage.KEYS_SHARED
    # a share sealed for another receiver does not open here either
    with pytest.raises(SecurityError):
        clients[1].handle(MaskedInputRequest(2, {2: inboxes[3][2]}), CONTRIBUTION)
