"""Secure aggregation's cryptography: X25519 agreement, HKDF, AES-GCM shares, AES-CTR masks.

Everything comes from ``cryptography``; nothing here is home-made. Two
parties derive the same 256-bit secret from X25519 and HKDF-SHA256, with the
run, round and purpose in HKDF's ``info`` so that a key of one round is
useless in the next. Masks are the AES-256-CTR keystream of that whole
secret, read as uint32: a CSPRNG, never a numpy generator seeded with a few
bytes. Encrypted shares carry sender, receiver, run, round and stage in
AES-GCM's associated data, so a share replayed anywhere else fails to open.

>>> alice, bob = KeyPair.generate(), KeyPair.generate()
>>> context = SessionContext(run_id="run", round=3)
>>> agree(alice, bob.public, context, Purpose.MASK) == agree(
...     bob, alice.public, context, Purpose.MASK)
True
"""

from __future__ import annotations

import enum
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shoal.core.errors import ProtocolError, SecurityError

KEY_BYTES = 32
NONCE_BYTES = 12
SEED_BYTES = 32
_VERSION = b"shoal-secagg-v1"
_SHA256 = hashes.SHA256()


class Purpose(enum.Enum):
    """What an agreed secret is for; part of the HKDF info, so the two never coincide."""

    SHARE_KEY = "share-key"  # AES-GCM key of the channel that carries Shamir shares
    MASK = "mask"  # the seed of a pairwise mask


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What binds a key or a ciphertext to one protocol run: the run and round."""

    run_id: str
    round: int

    def encode(self) -> bytes:
        return _fields(self.run_id.encode(), str(self.round).encode())


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings, with the loaded key kept for agreements."""

    private: bytes
    public: bytes
    key: X25519PrivateKey = field(compare=False, repr=False)

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        return cls(private=_raw_private(key), public=_raw_public(key.public_key()), key=key)

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        key = _load_private(private)
        return cls(private=private, public=_raw_public(key.public_key()), key=key)


def agree(
    private: KeyPair | bytes, peer_public: bytes, context: SessionContext, purpose: Purpose
) -> bytes:
    """The 32-byte secret both sides derive: HKDF-SHA256 over the X25519 shared secret."""
    key = private.key if isinstance(private, KeyPair) else _load_private(private)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a malformed or low-order public key
        raise SecurityError(f"key agreement failed: {exc}") from exc
    info = _agreement_info(purpose, context)
    return HKDF(algorithm=_SHA256, length=KEY_BYTES, salt=None, info=info).derive(shared)


@functools.lru_cache(maxsize=256)
def _agreement_info(purpose: Purpose, context: SessionContext) -> bytes:
    # a client derives two secrets per neighbour in one context: build its info once
    return _fields(_VERSION, purpose.value.encode(), context.encode())


def new_seed() -> bytes:
    """A fresh self-mask seed from the OS CSPRNG."""
    return os.urandom(SEED_BYTES)


def expand_mask(seed: bytes, length: int) -> npt.NDArray[np.uint32]:
    """``length`` uint32 values of the AES-256-CTR keystream keyed by the whole 32-byte seed."""
    if length < 0:
        raise ProtocolError(f"mask length must be >= 0, got {length}")
    encryptor = _keystream_cipher(seed)
    mask = np.zeros(length + 4, dtype="<u4")  # update_into wants a block of headroom
    buffer = memoryview(mask.data).cast("B")
    encryptor.update_into(buffer[: 4 * length], buffer)  # the keystream XOR zeros, in place
    return mask[:length].astype(np.uint32, copy=False)


BLOCK_VALUES = 32_768  # values per block when a long vector is worked in pieces: 128 KiB of uint32


class Keystream:
    """The keystream of :func:`expand_mask`, read in consecutive blocks.

    ``read(n)`` then ``read(m)`` give the first n + m values of
    ``expand_mask(seed, n + m)``. A long vector can then be worked in blocks
    that stay in the processor's cache, and nothing of its size is
    allocated: each block is written into the same small buffer.
    """

    __slots__ = ("_buffer", "_bytes", "_encryptor")

    def __init__(self, seed: bytes) -> None:
        self._encryptor = _keystream_cipher(seed)
        self._buffer = np.empty(BLOCK_VALUES + 4, dtype="<u4")  # update_into wants headroom
        self._bytes = memoryview(self._buffer.data).cast("B")

    def read(self, count: int) -> npt.NDArray[np.uint32]:
        """The next ``count`` values (at most ``BLOCK_VALUES``), valid until the next read."""
        if not 0 <= count <= BLOCK_VALUES:
            raise ProtocolError(f"a keystream block holds 0 to {BLOCK_VALUES} values, not {count}")
        self._encryptor.update_into(_ZEROS[: 4 * count], self._bytes)
        return self._buffer[:count].view(np.uint32)


def add_masks(
    vector: npt.NDArray[np.uint32], *, add: Sequence[bytes] = (), subtract: Sequence[bytes] = ()
) -> None:
    """Add the mask of every seed in ``add`` to ``vector`` and subtract those in ``subtract``.

    In place and modulo 2^32, the same as ``vector += expand_mask(seed, n)``
    for each seed in turn, but in one pass: block by block, every mask's
    keystream is added while the vector's block is still in the cache. A
    client that adds its self mask and k pairwise masks then moves its
    vector through memory once instead of k + 1 times, and never allocates
    a mask.
    """
    streams: list[tuple[CipherContext, np.ufunc]] = [
        (_keystream_cipher(seed), np.add) for seed in add
    ]
    streams += [(_keystream_cipher(seed), np.subtract) for seed in subtract]
    scratch = np.empty(BLOCK_VALUES + 4, dtype="<u4")  # update_into wants headroom
    raw = memoryview(scratch.data).cast("B")
    for start in range(0, vector.size, BLOCK_VALUES):
        piece = vector[start : start + BLOCK_VALUES]
        zeros = _ZEROS[: 4 * piece.size]
        for encryptor, operation in streams:
            encryptor.update_into(zeros, raw)
            operation(piece, scratch[: piece.size], out=piece)


_ZEROS = bytes(4 * BLOCK_VALUES)


def _keystream_cipher(seed: bytes) -> CipherContext:
    if len(seed) != SEED_BYTES:
        raise ProtocolError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()


@dataclass(frozen=True, slots=True)
class ShareAddress:
    """Who sent a sealed share to whom, in which run, round and stage: its AES-GCM AAD."""

    context: SessionContext
    stage: str
    sender: int
    receiver: int

    def encode(self) -> bytes:
        nodes = _fields(str(self.sender).encode(), str(self.receiver).encode())
        return _address_prefix(self.context, self.stage) + nodes


@functools.lru_cache(maxsize=64)
def _address_prefix(context: SessionContext, stage: str) -> bytes:
    # the fields all of a stage's addresses share, framed once: a round seals hundreds of shares
    return _fields(_VERSION, context.encode(), stage.encode())


def seal(key: bytes, plaintext: bytes, address: ShareAddress) -> bytes:
    """AES-256-GCM with a random nonce, bound to ``address``; nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, address.encode())


def open_sealed(key: bytes, sealed: bytes, address: ShareAddress) -> bytes:
    """The plaintext of :func:`seal`; a tampered, misaddressed or replayed one raises."""
    if len(sealed) < NONCE_BYTES + 16:
        raise SecurityError("a sealed share is too short to be genuine")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], address.encode())
    except InvalidTag:
        raise SecurityError(
            f"the share from {address.sender} to {address.receiver} failed authentication: "
            "tampered, or sealed for another run, round or stage"
        ) from None


def _fields(*fields: bytes) -> bytes:
    return b"".join(len(field).to_bytes(4, "big") + field for field in fields)


def _load_private(private: bytes) -> X25519PrivateKey:
    if len(private) != KEY_BYTES:
        raise ProtocolError(f"an X25519 private key has {KEY_BYTES} bytes, got {len(private)}")
    return X25519PrivateKey.from_private_bytes(private)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
