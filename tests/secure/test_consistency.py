"""Identity signatures, seed commitments and share digests: bound to what they are about."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core import ProtocolError
from shoal.secure.consistency import (
    IdentityKey,
    Verifier,
    advertisement_message,
    half_digest,
    seed_commitment,
    share_digest,
    small_order,
    survivors_message,
)
from shoal.secure.crypto import SessionContext
from shoal.transport.signing import generate_client_key

CONTEXT = SessionContext("run", 3)
ORDER = 2**252 + 27742317777372353535851937790883648493  # of Ed25519's base point


def test_an_enrolled_key_signs_and_its_public_half_verifies() -> None:
    private, public = generate_client_key()
    identity = IdentityKey.from_private(private)
    assert identity.public == public
    key = bytes(range(32))
    message = survivors_message(CONTEXT, frozenset({1, 2, 5}), signer=2, mask_key=key)
    signature = identity.sign(message)
    verifier = Verifier(public)
    assert verifier.verify(signature, message)
    for other in (
        survivors_message(CONTEXT, frozenset({1, 2}), signer=2, mask_key=key),
        survivors_message(SessionContext("run", 4), frozenset({1, 2, 5}), signer=2, mask_key=key),
        survivors_message(CONTEXT, frozenset({1, 2, 5}), signer=5, mask_key=key),
        survivors_message(CONTEXT, frozenset({1, 2, 5}), signer=2, mask_key=bytes(32)),
    ):
        assert not verifier.verify(signature, other)
    assert not Verifier(IdentityKey.generate().public).verify(signature, message)
    assert not verifier.verify(signature[:10], message)


def test_each_kind_of_message_is_domain_separated() -> None:
    nodes = survivors_message(CONTEXT, frozenset({1}), signer=1, mask_key=b"")
    keys = advertisement_message(CONTEXT, 1, cipher=b"", mask=b"", seed_commitment=b"")
    assert nodes != keys and b"survivors" in nodes and b"advertise" in keys
    empty = survivors_message(CONTEXT, frozenset(), signer=1, mask_key=b"")
    assert empty != survivors_message(CONTEXT, frozenset({0}), signer=1, mask_key=b"")


def test_commitments_and_digests_bind_their_nodes_and_halves() -> None:
    seed = bytes(range(32))
    assert seed_commitment(CONTEXT, 1, seed) != seed_commitment(CONTEXT, 2, seed)
    assert seed_commitment(CONTEXT, 1, seed) != seed_commitment(SessionContext("run", 4), 1, seed)
    digest = share_digest(CONTEXT, dealer=1, holder=2, key_half=b"k" * 64, seed_half=b"s" * 64)
    assert digest[:32] == half_digest(CONTEXT, 1, 2, b"key", b"k" * 64)
    assert digest[32:] == half_digest(CONTEXT, 1, 2, b"seed", b"s" * 64)
    assert half_digest(CONTEXT, 1, 2, b"key", b"x") != half_digest(CONTEXT, 2, 1, b"key", b"x")


def test_a_share_digest_is_the_sha256_of_its_framed_fields() -> None:
    # the framing is the wire contract between a dealer and the server: each field prefixed
    # with its 4-byte big-endian length
    def framed(*fields: bytes) -> bytes:
        return b"".join(len(field).to_bytes(4, "big") + field for field in fields)

    for dealer, holder, half, data in ((1, 2, b"key", b"k" * 64), (70_000, 3, b"seed", b"")):
        nodes = (dealer.to_bytes(4, "big"), holder.to_bytes(4, "big"))
        fields = framed(b"shoal.v1/secagg/share-" + half, CONTEXT.encode(), *nodes, data)
        expected = hashlib.sha256(fields).digest()
        assert half_digest(CONTEXT, dealer, holder, half, data) == expected


def test_malformed_keys_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="32 bytes"):
        IdentityKey.from_private(b"short")
    with pytest.raises(ProtocolError, match="32 bytes"):
        Verifier(b"")


def test_a_malleated_signature_is_refused() -> None:
    identity = IdentityKey.generate()
    message = survivors_message(CONTEXT, frozenset({1, 2}), signer=1, mask_key=bytes(32))
    signature = identity.sign(message)
    verifier = Verifier(identity.public)
    scalar = int.from_bytes(signature[32:], "little") + ORDER  # the same point, another encoding
    assert not verifier.verify(signature[:32] + scalar.to_bytes(32, "little"), message)
    assert not verifier.verify(bytes([signature[0] ^ 1]) + signature[1:], message)


def test_a_small_order_identity_cannot_sign_every_message() -> None:
    # with the neutral point as its key, R = neutral and S = 0 satisfy the verification equation
    # for any message: a key anyone could sign for (this platform's OpenSSL accepts it)
    neutral = bytes([1]) + bytes(31)
    universal = neutral + bytes(32)
    for message in (b"", survivors_message(CONTEXT, frozenset({1}), signer=1, mask_key=b"")):
        assert not Verifier(neutral).verify(universal, message)


P = 2**255 - 19
D = -121665 * pow(121666, -1, P) % P  # Ed25519's curve constant


def _roots(square: int) -> list[int]:
    """The square roots of ``square`` modulo P (p = 5 mod 8), none when it has none."""
    root = pow(square, (P + 3) // 8, P)
    if root * root % P != square % P:
        root = root * pow(2, (P - 1) // 4, P) % P  # times a square root of -1
    return sorted({root, P - root}) if root * root % P == square % P else []


def _torsion_ys() -> list[int]:
    """The y of every point of order dividing 8: 1 (neutral), -1 (order 2), 0 (order 4), and
    the y with y^2 = (-1 +- sqrt(1 + d)) / d, where doubling lands on y = 0 (order 8)."""
    eighth = [y for root in _roots(1 + D) for y in _roots((-1 + root) * pow(D, -1, P) % P)]
    return [1, P - 1, 0, *eighth]


def _encoded(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


def test_every_small_order_key_is_refused_in_every_encoding() -> None:
    ys = _torsion_ys()
    assert len(ys) == 5  # 8 points: x = 0 for y = 1 and -1, x = +-x otherwise
    for y in ys:
        for sign in (0, 1):
            assert small_order(_encoded(y, sign)), y
            assert not Verifier(_encoded(y, sign)).verify(bytes(64), b"any message")
    for y in range(19):  # y + P still fits in 255 bits: a second encoding of a small y
        assert small_order(_encoded(y + P))


@settings(max_examples=50, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=300))
def test_a_real_identity_is_not_small_order_and_verifies(seed: bytes, message: bytes) -> None:
    identity = IdentityKey.from_private(seed)
    assert not small_order(identity.public)
    assert Verifier(identity.public).verify(identity.sign(message), message)
