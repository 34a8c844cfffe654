"""Identity signatures, seed commitments and share digests: bound to what they are about."""

from __future__ import annotations

import hashlib

import nacl.bindings
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
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


@settings(max_examples=25, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=300))
def test_signatures_cross_between_cryptography_and_libsodium(seed: bytes, message: bytes) -> None:
    # keys sign with cryptography (OpenSSL) and verify with libsodium: both must agree
    identity = IdentityKey.from_private(seed)
    public, secret = nacl.bindings.crypto_sign_seed_keypair(seed)
    assert public == identity.public
    made_by_libsodium = nacl.bindings.crypto_sign(message, secret)[:64]
    assert made_by_libsodium == identity.sign(message)  # Ed25519 signatures are deterministic
    assert Verifier(public).verify(identity.sign(message), message)
    Ed25519PublicKey.from_public_bytes(public).verify(made_by_libsodium, message)  # or raises


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
