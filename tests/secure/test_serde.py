"""SecAgg+ frames: every message round-trips; malformed frames are protocol errors."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.core import ProtocolError
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    Advertisement,
    ConsistencyRequest,
    KeysAdvertised,
    MaskedInput,
    MaskedInputRequest,
    PeerKeys,
    PublicKeys,
    SessionConfig,
    ShareKeysRequest,
    SharesSent,
    SurvivorsSigned,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.quantization import Quantization
from shoal.secure.serde import Message, decode_message, encode_message, message_size

KEYS = PublicKeys(bytes(range(32)), bytes(range(1, 33)))
SIGNED = Advertisement(KEYS, b"c" * 32, b"s" * 64)
PEER = PeerKeys(b"i" * 32, SIGNED)
DIGEST = b"d" * 64
SESSION = SessionConfig("run-é", 4, 9, 100, 5, Quantization(clip=2.5, bits=12, max_weight=7))
MESSAGES: list[Message] = [
    AdvertiseKeysRequest(4, SESSION, 3, frozenset({1, 2, 9})),
    AdvertiseKeysRequest(4, SESSION, 3, frozenset()),
    ShareKeysRequest(4, {1: PEER, 7: PEER}),
    ShareKeysRequest(4, {}),
    MaskedInputRequest(4, {2: b"sealed", 5: b""}, {2: DIGEST, 5: DIGEST}),
    ConsistencyRequest(4, frozenset({1, 3, 8})),
    UnmaskRequest(4, {1: b"s" * 64, 3: b"t" * 64}),
    UnmaskRequest(4, {}),
    KeysAdvertised(4, SIGNED),
    SharesSent(4, {2: b"x" * 156}, {2: DIGEST}),
    SurvivorsSigned(4, b"s" * 64),
    UnmaskShares(4, {1: b"a" * 64}, {2: b"b" * 64}),
    UnmaskShares(0, {}, {}),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    frame = encode_message(message)
    assert decode_message(frame) == message
    assert message_size(message) == len(frame)


@pytest.mark.parametrize("length", [0, 1, 1000])
def test_masked_inputs_round_trip(length: int) -> None:
    vector = np.arange(length, dtype=np.uint32) * 4_000_000
    decoded = decode_message(encode_message(MaskedInput(2, vector)))
    assert isinstance(decoded, MaskedInput)
    assert decoded.vector.dtype == np.uint32
    assert np.array_equal(decoded.vector, vector)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_truncated_and_padded_frames_are_refused(message: Message) -> None:
    frame = encode_message(message)
    for cut in {1, len(frame) // 2, len(frame) - 1}:
        with pytest.raises(ProtocolError):
            decode_message(frame[:cut])
    with pytest.raises(ProtocolError, match="trailing"):
        decode_message(frame + b"\0")


def test_foreign_and_unknown_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="not a secure-aggregation frame"):
        decode_message(b"HTTP/1.1 200")
    with pytest.raises(ProtocolError, match="unknown"):
        decode_message(b"SSA2\x63" + bytes(8))
    with pytest.raises(ProtocolError):
        decode_message(b"")
    frame = encode_message(KeysAdvertised(4, SIGNED))
    keys_at = frame.index(KEYS.cipher)
    bad_keys = frame[:keys_at] + b"\0" * 64 + frame[keys_at + 64 :]
    with pytest.raises(ProtocolError, match="must differ"):
        decode_message(bad_keys)
    with pytest.raises(ProtocolError, match="SecAgg"):
        decode_message(b"SSA1\x05" + frame[5:])  # a frame of the protocol before the check


def test_a_digest_for_every_share_and_signatures_of_their_size() -> None:
    with pytest.raises(ProtocolError, match="digest"):
        SharesSent(4, {2: b"x"}, {})
    with pytest.raises(ProtocolError, match="64 bytes"):
        UnmaskRequest(4, {1: b"short"})
    with pytest.raises(ProtocolError, match="empty"):
        ConsistencyRequest(4, frozenset())


def test_a_session_naming_a_run_id_past_the_limit_is_malformed() -> None:
    """A hostile coordinator's 4 MB run id was kept, one per signed round, by the client."""
    quantization = Quantization(clip=2.5, bits=12, max_weight=7)
    SessionConfig("r" * 128, 4, 9, 100, 5, quantization)
    for run_id in ("", "r" * 129, "r" * 4 * 2**20):
        with pytest.raises(ProtocolError, match="run id has 1 to 128 characters") as refused:
            SessionConfig(run_id, 4, 9, 100, 5, quantization)
        assert len(str(refused.value)) < 100
