"""SecAgg+'s defences against active adversaries: identity signatures, commitments, share digests.

The semi-honest protocol trusts the server to tell every client the same
story about who survived. Against a malicious server (Bonawitz et al., CCS
2017, the actively secure variant), each client holds a long-term Ed25519
identity: it signs the X25519 keys it advertises (so the server cannot swap
them), and after the masked-input stage it signs the survivor set the
server announces; a client reveals shares only for a set that at least t of
the clients it knows have signed, and it signs one set per round.

Against a dishonest client, each one commits to its self-mask seed (its
mask public key already binds its mask key), and the dealer of every share
publishes a digest of each half of it: the server checks each revealed
share against its digest (a mismatch convicts the holder) and every rebuilt
secret against its commitment (a mismatch with digests that held convicts
the dealer).

Every signed or hashed message is domain-separated and bound to the run,
the round and the nodes concerned. Everything comes from ``cryptography``
and ``hashlib``. An identity key of small order (which OpenSSL accepts, and
for which one signature verifies for every message) never verifies: see
:func:`small_order`.

>>> identity = IdentityKey.generate()
>>> context = SessionContext("run", 1)
>>> message = survivors_message(context, frozenset({1, 2}), signer=1, mask_key=bytes(32))
>>> Verifier(identity.public).verify(identity.sign(message), message)
True
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from shoal.core.errors import ProtocolError
from shoal.secure.crypto import SessionContext

IDENTITY_KEY_BYTES = 32
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32
SHARE_DIGEST_BYTES = 2 * DIGEST_BYTES  # the mask-key half, then the seed half

_DOMAIN = b"shoal.v1/secagg/"


def _fields(*parts: bytes) -> bytes:
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _node(node: int) -> bytes:
    return node.to_bytes(4, "big")


@functools.lru_cache(maxsize=64)
def _context_bytes(context: SessionContext) -> bytes:
    return context.encode()  # the same few contexts, encoded for every signature and digest


@dataclass(frozen=True, slots=True)
class IdentityKey:
    """A client's long-term Ed25519 signing key (its enrolled identity, or a simulated one)."""

    private: bytes
    public: bytes
    key: Ed25519PrivateKey = field(compare=False, repr=False)

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls.from_key(Ed25519PrivateKey.generate())

    @classmethod
    def from_private(cls, private: bytes) -> IdentityKey:
        if len(private) != IDENTITY_KEY_BYTES:
            raise ProtocolError(f"an Ed25519 private key has 32 bytes, got {len(private)}")
        return cls.from_key(Ed25519PrivateKey.from_private_bytes(private))

    @classmethod
    def from_key(cls, key: Ed25519PrivateKey) -> IdentityKey:
        return cls(key.private_bytes_raw(), key.public_key().public_bytes_raw(), key)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


class Verifier:
    """One identity's Ed25519 public key, loaded once and used for many checks; a key that is
    no point, not canonical, or of small order verifies nothing."""

    __slots__ = ("_key", "public")

    def __init__(self, public: bytes) -> None:
        if len(public) != IDENTITY_KEY_BYTES:
            raise ProtocolError(f"an Ed25519 public key has 32 bytes, got {len(public)}")
        self.public = public
        self._key = _verifying_key(public)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this identity's over ``message``."""
        if len(signature) != SIGNATURE_BYTES or self._key is None:
            return False
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


_FIELD = 2**255 - 19  # Curve25519's prime


@functools.lru_cache(maxsize=4096)
def _verifying_key(public: bytes) -> Ed25519PublicKey | None:
    """The key, loaded (None: not a point, or unsafe); long-term identities recur round after
    round, so each is checked once per process."""
    if small_order(public):
        return None
    try:
        return Ed25519PublicKey.from_public_bytes(public)
    except ValueError:
        return None


@functools.lru_cache(maxsize=1)
def _probe() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def small_order(public: bytes) -> bool:
    """Whether an encoded Ed25519 key is of small order (in the 8-torsion), or not canonical.

    With such a key A, ``[S]B = R + [k]A`` holds for R in the torsion and S = 0 for many or all
    messages: a signature anyone can make (RFC 8032 lets a verifier refuse these keys, and
    OpenSSL does not). The check maps the key's y to its Montgomery u = (1 + y) / (1 - y) and
    asks X25519, whose clamped scalar is a multiple of the cofactor 8, for a shared secret: it
    is all zero exactly when the point's order divides 8. A y of 1 (the neutral point) has no
    u; a y at or above the prime is another encoding of a smaller one.
    """
    y = int.from_bytes(public, "little") & ((1 << 255) - 1)
    if y >= _FIELD or y == 1:
        return True
    u = (1 + y) * pow(1 - y, -1, _FIELD) % _FIELD
    try:
        _probe().exchange(X25519PublicKey.from_public_bytes(u.to_bytes(32, "little")))
    except ValueError:  # an all-zero shared secret: the point vanished under the cofactor
        return True
    return False


def check_identity_key(public: bytes, what: str) -> None:
    if len(public) != IDENTITY_KEY_BYTES:
        raise ProtocolError(f"{what}: an Ed25519 public key has 32 bytes, got {len(public)}")


def check_signature(signature: bytes, what: str) -> None:
    if len(signature) != SIGNATURE_BYTES:
        raise ProtocolError(f"{what}: an Ed25519 signature has 64 bytes, got {len(signature)}")


# --- what is signed ----------------------------------------------------------------------------


def advertisement_message(
    context: SessionContext, node: int, *, cipher: bytes, mask: bytes, seed_commitment: bytes
) -> bytes:
    """What a client signs in stage 1: its two X25519 keys and its seed commitment, as ``node``."""
    return _fields(
        _DOMAIN + b"advertise", _context_bytes(context), _node(node), cipher, mask, seed_commitment
    )


def survivors_message(
    context: SessionContext, survivors: frozenset[int], *, signer: int, mask_key: bytes
) -> bytes:
    """What a client signs in the consistency stage: the exact survivor set of this round, as
    ``signer`` with the mask key it advertised in this session (so that a signature from an
    earlier session of the same round, under other keys, does not count)."""
    return _fields(
        _DOMAIN + b"survivors",
        _context_bytes(context),
        _node(signer),
        mask_key,
        _set_bytes(survivors),
    )


@functools.lru_cache(maxsize=8)
def _set_bytes(survivors: frozenset[int]) -> bytes:
    return np.array(sorted(survivors), dtype=">u4").tobytes()  # every signer's message holds it


# --- what is committed -------------------------------------------------------------------------


def seed_commitment(context: SessionContext, node: int, seed: bytes) -> bytes:
    """The sha256 commitment to ``node``'s self-mask seed (32 random bytes: it hides the seed)."""
    framed = _fields(_DOMAIN + b"seed", _context_bytes(context), _node(node), seed)
    return hashlib.sha256(framed).digest()


def share_digest(
    context: SessionContext, *, dealer: int, holder: int, key_half: bytes, seed_half: bytes
) -> bytes:
    """The dealer's digest of the share it deals to ``holder``: one sha256 for each half."""
    return half_digest(context, dealer, holder, b"key", key_half) + half_digest(
        context, dealer, holder, b"seed", seed_half
    )


def half_digest(
    context: SessionContext, dealer: int, holder: int, half: bytes, data: bytes
) -> bytes:
    """The sha256 of one half (``b"key"`` or ``b"seed"``) of a share, bound to its two nodes."""
    framed = _NODES_AND_LENGTH.pack(4, dealer, 4, holder, len(data))  # _fields, in one call
    return hashlib.sha256(_half_prefix(context, half) + framed + data).digest()


_NODES_AND_LENGTH = struct.Struct(">IIIII")  # two framed nodes, then the length of what follows


@functools.lru_cache(maxsize=16)
def _half_prefix(context: SessionContext, half: bytes) -> bytes:
    # the framed fields every digest of this half in this session starts with: a round
    # computes hundreds of digests, each of a few bytes beyond them
    return _fields(_DOMAIN + b"share-" + half, _context_bytes(context))
