"""Secure aggregation's crypto: agreement is symmetric and bound, seals detect tampering."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from shoal.core import ProtocolError, SecurityError
from shoal.secure.crypto import (
    BLOCK_VALUES,
    KeyPair,
    Keystream,
    Purpose,
    SessionContext,
    ShareAddress,
    add_masks,
    agree,
    expand_mask,
    new_seed,
    open_sealed,
    seal,
)

CONTEXT = SessionContext(run_id="run", round=4)


def test_both_sides_agree_and_purposes_and_rounds_differ() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    mask = agree(alice, bob.public, CONTEXT, Purpose.MASK)
    assert mask == agree(bob, alice.public, CONTEXT, Purpose.MASK)
    assert mask == agree(bob.private, alice.public, CONTEXT, Purpose.MASK)
    assert len(mask) == 32
    assert mask != agree(alice, bob.public, CONTEXT, Purpose.SHARE_KEY)
    assert mask != agree(alice, bob.public, SessionContext("run", 5), Purpose.MASK)
    assert mask != agree(alice, bob.public, SessionContext("other", 4), Purpose.MASK)


def test_key_pair_round_trips_through_its_private_bytes() -> None:
    pair = KeyPair.generate()
    assert KeyPair.from_private(pair.private) == pair


def test_a_malformed_peer_key_is_a_security_error() -> None:
    with pytest.raises(SecurityError, match="key agreement failed"):
        agree(KeyPair.generate(), bytes(32), CONTEXT, Purpose.MASK)  # the all-zero point
    with pytest.raises(ProtocolError, match="32 bytes"):
        agree(b"short", KeyPair.generate().public, CONTEXT, Purpose.MASK)


def test_masks_are_the_aes_ctr_keystream_of_the_whole_seed() -> None:
    seed = new_seed()
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    expected = np.frombuffer(encryptor.update(bytes(4 * 1000)), dtype="<u4")
    assert np.array_equal(expand_mask(seed, 1000), expected)
    assert expand_mask(seed, 0).size == 0
    flipped = bytes([seed[0] ^ 1]) + seed[1:]
    assert not np.array_equal(expand_mask(flipped, 1000), expected)  # every byte of it counts


def test_masks_look_uniform() -> None:
    values = expand_mask(new_seed(), 200_000)
    counts = np.bincount(values >> 28, minlength=16)  # top four bits: 16 equal buckets
    chi_square = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi_square < 50  # 15 degrees of freedom: p < 1e-5 beyond this


def test_the_keystream_read_in_blocks_is_the_mask() -> None:
    seed = new_seed()
    length = 2 * BLOCK_VALUES + 7
    stream = Keystream(seed)
    pieces = [stream.read(size).copy() for size in (0, 3, BLOCK_VALUES, 1, BLOCK_VALUES, 3)]
    assert np.array_equal(np.concatenate(pieces), expand_mask(seed, length))
    with pytest.raises(ProtocolError, match="keystream block"):
        stream.read(BLOCK_VALUES + 1)
    with pytest.raises(ProtocolError, match="32 bytes"):
        Keystream(b"short")


@pytest.mark.parametrize("length", [0, 1, BLOCK_VALUES, 2 * BLOCK_VALUES + 5])
def test_adding_masks_in_one_pass_is_adding_each_expanded_mask(length: int) -> None:
    plus, minus = [new_seed(), new_seed()], [new_seed()]
    vector = np.random.default_rng(length).integers(0, 2**32, length, dtype=np.uint32)
    expected = vector.copy()
    for seed in plus:
        expected += expand_mask(seed, length)  # uint32 arithmetic wraps modulo 2^32
    expected -= expand_mask(minus[0], length)
    masked = vector.copy()
    add_masks(masked, add=plus, subtract=minus)
    assert np.array_equal(masked, expected)
    add_masks(masked, add=minus, subtract=plus)
    assert np.array_equal(masked, vector)
    add_masks(masked)  # no seeds: nothing changes
    assert np.array_equal(masked, vector)
    with pytest.raises(ProtocolError, match="32 bytes"):
        add_masks(masked, subtract=[b"short"])


@pytest.mark.parametrize("length", [-1])
def test_bad_mask_requests_are_refused(length: int) -> None:
    with pytest.raises(ProtocolError):
        expand_mask(new_seed(), length)
    with pytest.raises(ProtocolError, match="32 bytes"):
        expand_mask(b"short", 4)


def test_an_address_is_its_framed_fields() -> None:
    # the AES-GCM associated data both ends must build alike: each field length-prefixed
    fields = (b"shoal-secagg-v1", CONTEXT.encode(), b"share_keys", b"12", b"3")
    framed = b"".join(len(field).to_bytes(4, "big") + field for field in fields)
    assert ShareAddress(CONTEXT, "share_keys", sender=12, receiver=3).encode() == framed


def test_a_seal_opens_only_at_its_own_address() -> None:
    key = new_seed()
    address = ShareAddress(CONTEXT, "share_keys", sender=1, receiver=2)
    sealed = seal(key, b"share", address)
    assert open_sealed(key, sealed, address) == b"share"
    elsewhere = [
        ShareAddress(CONTEXT, "share_keys", sender=2, receiver=1),
        ShareAddress(CONTEXT, "unmask", sender=1, receiver=2),
        ShareAddress(SessionContext("run", 5), "share_keys", sender=1, receiver=2),
        ShareAddress(SessionContext("other", 4), "share_keys", sender=1, receiver=2),
    ]
    for other in elsewhere:
        with pytest.raises(SecurityError, match="failed authentication"):
            open_sealed(key, sealed, other)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecurityError):
        open_sealed(key, tampered, address)
    with pytest.raises(SecurityError, match="too short"):
        open_sealed(key, sealed[:10], address)
    with pytest.raises(SecurityError):
        open_sealed(new_seed(), sealed, address)
