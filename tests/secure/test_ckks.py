"""CKKS over TenSEAL: sums match plaintext sums; long, empty and tampered vectors; framing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.errors import ConfigError, ProtocolError, SecurityError
from shoal.secure.ckks import (
    CkksParameters,
    ConsortiumKeys,
    EncryptedSum,
    EncryptedVector,
    decrypt_vector,
    encrypt_vector,
    generate_keys,
    load_context,
    slot_count_of,
    sum_encrypted,
)

ts = pytest.importorskip("tenseal")

# CKKS at the default 2^40 scale errs by about 1e-8 per value for a sum of ten
# encryptions of values in [-1, 1]; 1e-6 leaves a margin of 50 and still
# catches any wrong chunk, slot or scale.
CKKS_TOLERANCE = 1e-6
SLOTS = CkksParameters().slot_count


@pytest.fixture(scope="module")
def keys() -> ConsortiumKeys:
    return generate_keys(CkksParameters())


@pytest.fixture(scope="module")
def other_keys() -> ConsortiumKeys:
    return generate_keys(CkksParameters())


def test_default_parameters_and_slot_count() -> None:
    params = CkksParameters()
    assert (params.poly_modulus_degree, params.coeff_mod_bit_sizes) == (8192, (60, 40, 40, 60))
    assert params.global_scale_bits == 40
    assert params.slot_count == 4096


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"poly_modulus_degree": 1000}, "one of"),
        ({"coeff_mod_bit_sizes": (60,)}, ">= 2 primes"),
        ({"coeff_mod_bit_sizes": [60, 40, 60]}, "tuple"),
        ({"coeff_mod_bit_sizes": (60, 10, 60)}, "20 to 60 bits"),
        ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, "128-bit security"),
        ({"global_scale_bits": 60}, "below the first prime"),
        ({"global_scale_bits": 10}, ">= 20"),
    ],
)
def test_parameters_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CkksParameters(**kwargs)  # type: ignore[arg-type]


def test_public_context_has_no_secret_key(keys: ConsortiumKeys) -> None:
    assert not load_context(keys.public_context).has_secret_key()
    assert load_context(keys.secret_context).has_secret_key()
    assert "secret" not in repr(keys).replace("secret=<hidden>", "")
    assert slot_count_of(load_context(keys.public_context)) == SLOTS


def test_sum_of_ten_silos_equals_plaintext_sum(keys: ConsortiumKeys) -> None:
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-1, 1, 1000) for _ in range(10)]
    encrypted = [encrypt_vector(keys.public_context, update) for update in updates]
    total = decrypt_vector(keys.secret_context, sum_encrypted(keys.public_context, encrypted))
    assert total.dtype == np.float64 and total.shape == (1000,)
    np.testing.assert_allclose(total, np.sum(updates, axis=0), rtol=0, atol=CKKS_TOLERANCE)


def test_vector_longer_than_the_slot_count_spans_ciphertexts(keys: ConsortiumKeys) -> None:
    values = np.linspace(-1, 1, 10_000, dtype=np.float32)
    encrypted = encrypt_vector(keys.public_context, values)
    assert encrypted.length == 10_000
    assert len(encrypted.chunks) == 3  # 4096 + 4096 + 1808
    total = decrypt_vector(
        keys.secret_context, sum_encrypted(keys.public_context, [encrypted, encrypted])
    )
    np.testing.assert_allclose(total, 2 * values.astype(np.float64), atol=CKKS_TOLERANCE)


@pytest.mark.parametrize("length", [1, SLOTS - 1, SLOTS, SLOTS + 1])
def test_chunk_boundaries(keys: ConsortiumKeys, length: int) -> None:
    values = np.arange(length, dtype=np.float64) / length
    encrypted = encrypt_vector(keys.public_context, values)
    assert len(encrypted.chunks) == -(-length // SLOTS)
    np.testing.assert_allclose(
        decrypt_vector(keys.secret_context, encrypted), values, atol=CKKS_TOLERANCE
    )


def test_empty_vector(keys: ConsortiumKeys) -> None:
    empty = encrypt_vector(keys.public_context, np.zeros(0))
    assert empty == EncryptedVector(length=0, chunks=())
    total = sum_encrypted(keys.public_context, [empty, empty])
    assert decrypt_vector(keys.secret_context, total).shape == (0,)
    assert EncryptedVector.from_bytes(empty.to_bytes()) == empty


def test_zero_vector_sums_to_zero(keys: ConsortiumKeys) -> None:
    zeros = encrypt_vector(keys.public_context, np.zeros(50, dtype=np.float32))
    total = decrypt_vector(keys.secret_context, sum_encrypted(keys.public_context, [zeros] * 3))
    np.testing.assert_allclose(total, 0.0, atol=CKKS_TOLERANCE)


def test_a_sum_of_nothing_is_refused(keys: ConsortiumKeys) -> None:
    with pytest.raises(ProtocolError, match="no encrypted vector"):
        sum_encrypted(keys.public_context, [])
    with pytest.raises(ProtocolError, match="no encrypted vector"):
        EncryptedSum(keys.public_context).result()


@pytest.mark.parametrize(
    "vector",
    [
        np.arange(3),  # integers
        np.ones((2, 2)),  # not 1-D
        np.array([1.0, np.nan]),
        np.array([np.inf]),
        np.ones(3, dtype=np.float16),
    ],
)
def test_encrypt_refuses_what_ckks_cannot_carry(keys: ConsortiumKeys, vector: np.ndarray) -> None:
    with pytest.raises(ProtocolError):
        encrypt_vector(keys.public_context, vector)


def test_incremental_sum_and_length_mismatch(keys: ConsortiumKeys) -> None:
    total = EncryptedSum(keys.public_context)
    assert total.count == 0
    total.add(encrypt_vector(keys.public_context, np.ones(5)))
    total.add(encrypt_vector(keys.public_context, np.full(5, 2.0)))
    with pytest.raises(ProtocolError, match="cannot add a vector of 6"):
        total.add(encrypt_vector(keys.public_context, np.ones(6)))
    assert total.count == 2
    np.testing.assert_allclose(
        decrypt_vector(keys.secret_context, total.result()), 3.0, atol=CKKS_TOLERANCE
    )


def test_a_failed_add_leaves_the_sum_unchanged(keys: ConsortiumKeys) -> None:
    context = load_context(keys.public_context)
    values = np.ones(SLOTS + 5)
    good = encrypt_vector(keys.public_context, values)
    # first chunk at the right scale, second at another: the add fails half-way
    odd_scale = ts.ckks_vector(context, values[SLOTS:].tolist(), scale=2.0**30).serialize()
    mixed = EncryptedVector(length=len(values), chunks=(good.chunks[0], bytes(odd_scale)))
    total = EncryptedSum(keys.public_context)
    total.add(good)
    with pytest.raises(SecurityError, match="cannot be added"):
        total.add(mixed)
    assert total.count == 1
    np.testing.assert_allclose(
        decrypt_vector(keys.secret_context, total.result()), values, atol=CKKS_TOLERANCE
    )


def test_public_context_cannot_decrypt(keys: ConsortiumKeys) -> None:
    encrypted = encrypt_vector(keys.public_context, np.ones(4))
    # TenSEAL itself refuses...
    ciphertext = ts.ckks_vector_from(ts.context_from(keys.public_context), encrypted.chunks[0])
    with pytest.raises(ValueError, match="secret"):
        ciphertext.decrypt()
    # ...and Shoal says so in its own terms
    with pytest.raises(SecurityError, match="no secret key"):
        decrypt_vector(keys.public_context, encrypted)


def test_altered_header_is_refused_by_seal(keys: ConsortiumKeys) -> None:
    encrypted = encrypt_vector(keys.public_context, np.ones(8))
    altered = bytearray(encrypted.chunks[0])
    altered[10] ^= 0x01  # inside SEAL's header
    tampered = EncryptedVector(encrypted.length, (bytes(altered),))
    with pytest.raises(SecurityError, match="not valid"):
        sum_encrypted(keys.public_context, [encrypted, tampered])
    with pytest.raises(SecurityError, match="not valid"):
        decrypt_vector(keys.secret_context, tampered)


def test_altered_coefficients_can_pass_seal_but_not_the_sha256(keys: ConsortiumKeys) -> None:
    values = np.linspace(-1, 1, 8)
    encrypted = encrypt_vector(keys.public_context, values)
    chunk = encrypted.chunks[0]
    accepted = 0
    for position in range(len(chunk) // 4, len(chunk) - 64, len(chunk) // 64):
        altered = bytearray(chunk)
        altered[position] ^= 0x01
        tampered = EncryptedVector(encrypted.length, (bytes(altered),))
        assert tampered.sha256() != encrypted.sha256()  # what the signed receipt catches
        try:
            garbage = decrypt_vector(keys.secret_context, tampered)
        except SecurityError:
            continue  # SEAL noticed this one (a coefficient above its modulus)
        accepted += 1
        assert np.max(np.abs(garbage - values)) > 1.0
        break
    assert accepted > 0, "SEAL caught every flip: the sha256 binding is still what counts"


def test_ciphertexts_of_other_parameters_are_refused(keys: ConsortiumKeys) -> None:
    small = generate_keys(
        CkksParameters(
            poly_modulus_degree=4096, coeff_mod_bit_sizes=(40, 20, 40), global_scale_bits=21
        )
    )
    foreign = encrypt_vector(small.public_context, np.ones(10))
    with pytest.raises(SecurityError, match="not valid"):
        decrypt_vector(keys.secret_context, foreign)


def test_another_consortiums_key_decrypts_to_noise(
    keys: ConsortiumKeys, other_keys: ConsortiumKeys
) -> None:
    encrypted = encrypt_vector(other_keys.public_context, np.ones(10))
    assert np.max(np.abs(decrypt_vector(keys.secret_context, encrypted) - 1.0)) > 1.0


def test_chunk_layout_is_checked_against_the_context(keys: ConsortiumKeys) -> None:
    encrypted = encrypt_vector(keys.public_context, np.ones(10))
    with pytest.raises(ProtocolError, match="holds 10 values, not 9"):
        decrypt_vector(keys.secret_context, EncryptedVector(9, encrypted.chunks))
    with pytest.raises(ProtocolError, match="takes 1 ciphertexts"):
        decrypt_vector(keys.secret_context, EncryptedVector(10, encrypted.chunks * 2))


def test_contexts_that_are_not_ckks_are_refused() -> None:
    with pytest.raises(ProtocolError, match="not a serialized TenSEAL context"):
        load_context(b"garbage")
    bfv = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=1032193)
    with pytest.raises(ProtocolError, match="not a CKKS context"):
        load_context(bfv.serialize())


# --- framing (no TenSEAL needed) ---------------------------------------------------------

chunk_lists = st.lists(st.binary(min_size=1, max_size=40), min_size=0, max_size=5)


@settings(max_examples=60, deadline=None)
@given(chunks=chunk_lists, extra=st.integers(0, 100))
def test_framing_round_trips(chunks: list[bytes], extra: int) -> None:
    vector = EncryptedVector(length=len(chunks) + extra if chunks else 0, chunks=tuple(chunks))
    data = vector.to_bytes()
    assert EncryptedVector.from_bytes(data) == vector
    assert vector.num_bytes == len(data)
    assert vector.sha256() == hashlib.sha256(data).hexdigest()


@settings(max_examples=30, deadline=None)
@given(chunks=chunk_lists.filter(bool), cut=st.integers(1, 1000))
def test_every_truncation_and_any_trailing_byte_is_refused(chunks: list[bytes], cut: int) -> None:
    data = EncryptedVector(length=len(chunks), chunks=tuple(chunks)).to_bytes()
    with pytest.raises(ProtocolError):
        EncryptedVector.from_bytes(data[: max(0, len(data) - cut)])
    with pytest.raises(ProtocolError, match="trailing"):
        EncryptedVector.from_bytes(data + b"\x00")


def test_malformed_headers_are_refused() -> None:
    data = bytearray(EncryptedVector(length=3, chunks=(b"a", b"b")).to_bytes())
    with pytest.raises(ProtocolError, match="does not start with"):
        EncryptedVector.from_bytes(b"X" + bytes(data[1:]))
    wrong_version = bytearray(data)
    wrong_version[9] = 2
    with pytest.raises(ProtocolError, match="format 2"):
        EncryptedVector.from_bytes(bytes(wrong_version))
    too_many = (
        EncryptedVector(length=3, chunks=(b"a",) * 3)
        .to_bytes()
        .replace(b"\x00" * 7 + b"\x03", b"\x00" * 7 + b"\x01", 1)
    )  # length 1, three chunks
    with pytest.raises(ProtocolError, match="3 ciphertexts for a vector of 1"):
        EncryptedVector.from_bytes(too_many)


@pytest.mark.parametrize(
    ("length", "chunks"),
    [(-1, ()), (0, (b"a",)), (3, ()), (1, (b"a", b"b")), (1, (b"",)), (1, ("a",))],
)
def test_encrypted_vector_invariants(length: int, chunks: tuple[object, ...]) -> None:
    with pytest.raises(ProtocolError):
        EncryptedVector(length=length, chunks=chunks)  # type: ignore[arg-type]
