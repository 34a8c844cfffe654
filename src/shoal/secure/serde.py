"""Secure-aggregation messages as bytes: a compact, strict binary framing any transport can carry.

A frame is a magic, the message's type code and its fields in a fixed order:
integers big-endian, byte strings and maps length-prefixed, the masked
vector as raw little-endian uint32. Decoding checks every length, so a
truncated or padded frame is a :class:`ProtocolError`, never a crash.

Besides SecAgg+'s ten messages, the frames carry a homomorphic round's
two: the :class:`EncryptionRequest` a silo's fit task holds and the
:class:`EncryptedUpdate` it answers with (its CKKS ciphertexts and signed
receipt, in their own checked encodings).

>>> decode_message(encode_message(message)) == message
True
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.core.digests import check_sha256_hex
from shoal.core.errors import ProtocolError
from shoal.secure.ckks import EncryptedVector
from shoal.secure.homomorphic import EncryptedUpdate, EncryptionRequest
from shoal.secure.keyholder import ContributionReceipt
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    Advertisement,
    ClientMessage,
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
    SurvivorsSigned,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.quantization import Quantization

MAGIC = b"SSA2"  # 2: signed keys, share digests and the consistency stage
SecureRequest = ServerRequest | EncryptionRequest
"""What a coordinator asks of a client in a secure round (either protocol)."""
SecureReply = ClientMessage | EncryptedUpdate
"""What a client answers in a secure round (either protocol)."""
Message = SecureRequest | SecureReply
FitRequest = MaskedInputRequest | EncryptionRequest
"""The request a secure round's fit task carries: mask the update, or encrypt it."""


_UINT = struct.Struct(">Q")
_NODE_AND_LENGTH = struct.Struct(">QQ")  # a map's entry: its node, then its blob's length


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []

    def uint(self, value: int) -> None:
        self.parts.append(_UINT.pack(value))

    def double(self, value: float) -> None:
        self.parts.append(struct.pack(">d", value))

    def blob(self, value: bytes) -> None:
        self.uint(len(value))
        self.parts.append(value)

    def vector(self, values: npt.NDArray[np.uint32]) -> None:
        # a view, not a copy: the frame's one join copies the 400 kB of a masked input once
        data = np.ascontiguousarray(values, dtype="<u4")
        self.uint(data.nbytes)
        self.parts.append(data.data.cast("B"))

    def nodes(self, values: frozenset[int]) -> None:
        self.uint(len(values))
        self.parts.append(np.array(sorted(values), dtype=">u4").tobytes())

    def blobs(self, values: Mapping[int, bytes]) -> None:
        self.uint(len(values))
        for node in sorted(values):
            value = values[node]
            self.parts += (_NODE_AND_LENGTH.pack(node, len(value)), value)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = memoryview(data), 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise ProtocolError("a secure-aggregation frame is truncated")
        chunk = bytes(self.data[self.offset : self.offset + size])
        self.offset += size
        return chunk

    def uint(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def double(self) -> float:
        return float(struct.unpack(">d", self.take(8))[0])

    def blob(self) -> bytes:
        return self.take(self.uint())

    def nodes(self) -> frozenset[int]:
        count = self.uint()
        values = np.frombuffer(self.take(4 * count), dtype=">u4")
        return frozenset(int(v) for v in values)

    def blobs(self) -> dict[int, bytes]:
        return {self.uint(): self.blob() for _ in range(self.uint())}

    def done(self) -> None:
        if self.offset != len(self.data):
            raise ProtocolError("a secure-aggregation frame has trailing bytes")


def _write_session(writer: _Writer, session: SessionConfig) -> None:
    writer.blob(session.run_id.encode())
    for value in (session.round, session.num_nodes, session.vector_length, session.threshold):
        writer.uint(value)
    quantization = session.quantization
    writer.double(quantization.clip)
    writer.uint(quantization.bits)
    writer.uint(quantization.max_weight)
    writer.double(quantization.loss_clip)


def _read_session(reader: _Reader) -> SessionConfig:
    run_id = reader.blob().decode()
    round_number, num_nodes, vector_length, threshold = (reader.uint() for _ in range(4))
    quantization = Quantization(
        clip=reader.double(),
        bits=reader.uint(),
        max_weight=reader.uint(),
        loss_clip=reader.double(),
    )
    return SessionConfig(run_id, round_number, num_nodes, vector_length, threshold, quantization)


def _write_body(writer: _Writer, message: Message) -> None:
    match message:
        case AdvertiseKeysRequest():
            _write_session(writer, message.session)
            writer.uint(message.node)
            writer.nodes(message.neighbours)
        case ShareKeysRequest():
            writer.blobs(
                {n: p.identity + _advertised(p.advertisement) for n, p in message.peers.items()}
            )
        case MaskedInputRequest() | SharesSent():
            writer.blobs(message.sealed_shares)
            writer.blobs(message.share_digests)
        case ConsistencyRequest():
            writer.nodes(message.survivors)
        case UnmaskRequest():
            writer.blobs(message.signatures)
        case KeysAdvertised():
            writer.blob(_advertised(message.advertisement))
        case SurvivorsSigned():
            writer.blob(message.signature)
        case MaskedInput():
            writer.vector(message.vector)
        case UnmaskShares():
            writer.blobs(message.seed_shares)
            writer.blobs(message.key_shares)
        case EncryptionRequest():
            writer.blob(message.run_id.encode())
            writer.blob(bytes.fromhex(message.public_context_sha256))
        case EncryptedUpdate():
            writer.blob(message.ciphertext.to_bytes())
            writer.blob(message.receipt.to_bytes())


def _encryption_request(reader: _Reader, round_number: int) -> EncryptionRequest:
    run_id = reader.blob().decode()
    digest = reader.blob().hex()
    check_sha256_hex(digest, "public_context_sha256")
    return EncryptionRequest(round_number, run_id, digest)


def _encrypted_update(reader: _Reader, round_number: int) -> EncryptedUpdate:
    ciphertext = EncryptedVector.from_bytes(reader.blob())
    return EncryptedUpdate(round_number, ciphertext, ContributionReceipt.from_bytes(reader.blob()))


_ADVERTISEMENT_BYTES = 32 + 32 + 32 + 64  # cipher key, mask key, seed commitment, signature


def _advertised(advertisement: Advertisement) -> bytes:
    keys = advertisement.keys
    return keys.cipher + keys.mask + advertisement.seed_commitment + advertisement.signature


def _advertisement(data: bytes) -> Advertisement:
    if len(data) != _ADVERTISEMENT_BYTES:
        raise ProtocolError(f"an advertisement has {_ADVERTISEMENT_BYTES} bytes, got {len(data)}")
    return Advertisement(PublicKeys(data[:32], data[32:64]), data[64:96], data[96:])


def _peer(data: bytes) -> PeerKeys:
    return PeerKeys(data[:32], _advertisement(data[32:]))


_READERS: dict[int, Callable[[_Reader, int], Any]] = {
    1: lambda r, n: AdvertiseKeysRequest(n, _read_session(r), r.uint(), r.nodes()),
    2: lambda r, n: ShareKeysRequest(n, {node: _peer(p) for node, p in r.blobs().items()}),
    3: lambda r, n: MaskedInputRequest(n, r.blobs(), r.blobs()),
    4: lambda r, n: UnmaskRequest(n, r.blobs()),
    5: lambda r, n: KeysAdvertised(n, _advertisement(r.blob())),
    6: lambda r, n: SharesSent(n, r.blobs(), r.blobs()),
    7: lambda r, n: MaskedInput(n, np.frombuffer(r.blob(), dtype="<u4").astype(np.uint32)),
    8: lambda r, n: UnmaskShares(n, r.blobs(), r.blobs()),
    9: _encryption_request,
    10: _encrypted_update,
    11: lambda r, n: ConsistencyRequest(n, r.nodes()),
    12: lambda r, n: SurvivorsSigned(n, r.blob()),
}
_CODES: dict[type, int] = {
    AdvertiseKeysRequest: 1,
    ShareKeysRequest: 2,
    MaskedInputRequest: 3,
    UnmaskRequest: 4,
    KeysAdvertised: 5,
    SharesSent: 6,
    MaskedInput: 7,
    UnmaskShares: 8,
    EncryptionRequest: 9,
    EncryptedUpdate: 10,
    ConsistencyRequest: 11,
    SurvivorsSigned: 12,
}


def encode_message(message: Message) -> bytes:
    """The frame of one request or reply."""
    writer = _Writer()
    writer.parts.append(MAGIC + bytes([_CODES[type(message)]]))
    writer.uint(message.round)
    _write_body(writer, message)
    return b"".join(writer.parts)


def decode_message(data: bytes) -> Message:
    """The message in a frame; anything malformed is a :class:`ProtocolError`."""
    reader = _Reader(data)
    magic = reader.take(len(MAGIC))
    if magic == b"SSA1":
        raise ProtocolError("a frame of the SecAgg+ protocol before its consistency check")
    if magic != MAGIC:
        raise ProtocolError("not a secure-aggregation frame")
    code = reader.take(1)[0]
    read = _READERS.get(code)
    if read is None:
        raise ProtocolError(f"unknown secure-aggregation message type {code}")
    round_number = reader.uint()
    try:
        message: Message = read(reader, round_number)
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ProtocolError(f"malformed secure-aggregation frame: {exc}") from exc
    reader.done()
    return message


def message_size(message: Message) -> int:
    """Bytes of ``message`` on the wire (its frame)."""
    return len(encode_message(message))
