"""Lossy upload codecs: round trips, unbiasedness, sizes, specs, and a hostile peer's bytes."""

from __future__ import annotations

import math
import struct
import tracemalloc
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.core.compression import (
    _HEADER,
    _TOPK_HEADER,
    BLOCK,
    MAGIC,
    Compression,
    decode,
    encode,
    with_feedback,
)
from shoal.core.errors import ConfigError, ModelError
from shoal.core.parameters import Vector

INT8 = Compression("int8")
TERNARY = Compression("ternary")
TOPK = Compression("topk", 0.01)
CODECS = [INT8, TERNARY, TOPK]

SIZES = [0, 1, 4, 5, 2047, 2048, 2049, int(np.random.default_rng(2024).integers(9_000, 11_000))]
TOPK_AT = _HEADER.size  # where a top-k payload's own header starts
STREAMS_AT = _HEADER.size + _TOPK_HEADER.size  # where its unary stream starts
LARGEST = float(np.finfo(np.float32).max)
SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)

few = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def payload_of(update: Vector, compression: Compression, seed: int = 0) -> bytes:
    return encode(update, compression, rng=np.random.default_rng(seed))


def round_trip(update: Vector, compression: Compression, seed: int = 0) -> Vector:
    return decode(payload_of(update, compression, seed), compression, size=len(update))


def sample(size: int, seed: int = 0) -> Vector:
    """Normal values whose blocks differ in magnitude a thousandfold, in turn 1e-3, 1, 1e3."""
    rng = np.random.default_rng(seed)
    magnitude = np.repeat(1000.0 ** (np.arange(-(-size // BLOCK)) % 3) / 1e3, BLOCK)[:size]
    return (rng.standard_normal(size) * magnitude).astype(np.float32)


def block_max(update: Vector) -> Vector:
    """Each value's block's largest magnitude."""
    blocks = -(-len(update) // BLOCK)
    padded = np.zeros(blocks * BLOCK, dtype=np.float32)
    padded[: len(update)] = np.abs(update)
    return np.repeat(padded.reshape(blocks, BLOCK).max(axis=1), BLOCK)[: len(update)]


def edited(payload: bytes, offset: int, fmt: str, *values: object) -> bytes:
    data = bytearray(payload)
    struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


def bits(*runs: Sequence[int]) -> list[int]:
    return [bit for run in runs for bit in run]


def binary(value: int, width: int) -> list[int]:
    return [(value >> shift) & 1 for shift in range(width - 1, -1, -1)]


def topk_payload(
    size: int,
    *,
    kept: int,
    rice: int,
    unary: Sequence[int],
    remainders: Sequence[int] = (),
    values: Sequence[float] | None = None,
    unary_bytes: int | None = None,
    extra_unary: bytes = b"",
) -> bytes:
    """A top-k payload built bit by bit, so that each field can lie on its own."""
    stream = np.packbits(np.array(unary, dtype=np.uint8)).tobytes() + extra_unary
    rest = np.packbits(np.array(remainders, dtype=np.uint8)).tobytes()
    chosen = np.ones(kept, dtype="<f4") if values is None else np.array(values, dtype="<f4")
    declared = len(stream) if unary_bytes is None else unary_bytes
    header = _HEADER.pack(MAGIC, 3, size) + _TOPK_HEADER.pack(kept, rice, declared)
    return header + stream + rest + chosen.tobytes()


def assert_int8_close(update: Vector, decoded: Vector) -> None:
    """Each value within its block's step (largest magnitude / 127), float32 rounding aside."""
    step = block_max(update).astype(np.float64) / 127
    error = np.abs(decoded.astype(np.float64) - update.astype(np.float64))
    assert (error <= step * (1 + 1e-5) + 128 * SUBNORMAL).all()


def assert_ternary(update: Vector, decoded: Vector) -> None:
    """Each value -s, 0 or +s of its block's scale s, never of the other sign, and a block's
    largest value always kept whole."""
    scale = block_max(update)
    assert ((decoded == 0) | (decoded == scale) | (decoded == -scale)).all()
    assert ((decoded == 0) | (np.sign(decoded) == np.sign(update))).all()
    largest = (np.abs(update) == scale) & (scale > 0)
    np.testing.assert_array_equal(decoded[largest], update[largest])


def assert_top_k(update: Vector, decoded: Vector, compression: Compression) -> None:
    """The kept values exactly, none but the largest in magnitude, zeros elsewhere."""
    kept = decoded != 0
    assert kept.sum() == min(compression.kept(len(update)), int((update != 0).sum()))
    np.testing.assert_array_equal(decoded[kept], update[kept])
    assert (decoded[~kept] == 0).all()
    if kept.any() and (~kept).any():
        assert np.abs(update[kept]).min() >= np.abs(update[~kept]).max()


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("compression", CODECS, ids=lambda c: c.spec)
def test_a_round_trip_gives_float32_of_the_update_size(compression: Compression, size: int) -> None:
    decoded = round_trip(sample(size), compression)
    assert decoded.shape == (size,)
    assert decoded.dtype == np.float32
    assert np.isfinite(decoded).all()


@pytest.mark.parametrize("size", SIZES)
def test_int8_errs_at_most_one_step_of_each_blocks_own_scale(size: int) -> None:
    update = sample(size)
    assert_int8_close(update, round_trip(update, INT8))


@pytest.mark.parametrize("size", SIZES)
def test_ternary_values_are_minus_zero_or_plus_their_blocks_scale(size: int) -> None:
    update = sample(size)
    assert_ternary(update, round_trip(update, TERNARY))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fraction", [0.01, 0.3, 1.0])
def test_topk_keeps_exactly_the_largest_values_and_zeros_the_rest(
    size: int, fraction: float
) -> None:
    rng = np.random.default_rng(size)
    magnitudes = rng.permutation(np.arange(1, size + 1))  # distinct: one right answer
    update = (magnitudes * rng.choice([-1, 1], size)).astype(np.float32)
    compression = Compression("topk", fraction)
    payload = payload_of(update, compression)
    decoded = decode(payload, compression, size=size)
    kept = compression.kept(size)
    assert _TOPK_HEADER.unpack_from(payload, TOPK_AT)[0] == kept
    largest = np.argsort(np.abs(update))[size - kept :]
    expected = np.zeros(size, dtype=np.float32)
    expected[largest] = update[largest]
    np.testing.assert_array_equal(decoded, expected)
    assert_top_k(update, decoded, compression)


def test_topk_keeps_at_least_one_value_and_never_more_than_there_are() -> None:
    assert Compression("topk", 0.01).kept(0) == 0
    assert Compression("topk", 0.01).kept(1) == 1
    assert Compression("topk", 0.01).kept(150) == 2
    assert Compression("topk", 1.0).kept(7) == 7


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("compression", CODECS, ids=lambda c: c.spec)
def test_an_all_zero_update_decodes_to_zeros(compression: Compression, size: int) -> None:
    decoded = round_trip(np.zeros(size, dtype=np.float32), compression)
    np.testing.assert_array_equal(decoded, np.zeros(size, dtype=np.float32))


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: c.spec)
def test_one_huge_value_survives_and_flattens_only_its_own_block(
    compression: Compression,
) -> None:
    update = sample(3 * BLOCK, seed=1) / np.float32(1e3)
    update[BLOCK + 17] = -1e30
    decoded = round_trip(update, compression)
    assert decoded[BLOCK + 17] == pytest.approx(-1e30, rel=1e-6)
    if compression is INT8:
        assert_int8_close(update, decoded)
        assert (decoded[BLOCK : 2 * BLOCK][np.arange(BLOCK) != 17] == 0).all()
        assert np.count_nonzero(decoded[:BLOCK]) > BLOCK // 2  # the other blocks keep detail
    elif compression is TERNARY:
        assert_ternary(update, decoded)
    else:
        assert_top_k(update, decoded, compression)


def test_an_empty_update_is_a_header_alone_for_the_quantizers() -> None:
    for compression in (INT8, TERNARY):
        payload = payload_of(np.zeros(0, dtype=np.float32), compression)
        assert len(payload) == _HEADER.size
        assert decode(payload, compression, size=0).shape == (0,)


# --- properties -----------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
lengths = st.integers(0, 2 * BLOCK + 3)


@few
@given(hnp.arrays(np.float32, lengths, elements=finite), st.integers(0, 2**32))
def test_int8_round_trips_any_finite_update(update: Vector, seed: int) -> None:
    decoded = round_trip(update, INT8, seed)
    assert decoded.shape == update.shape
    assert decoded.dtype == np.float32
    assert_int8_close(update, decoded)


@few
@given(hnp.arrays(np.float32, lengths, elements=finite), st.integers(0, 2**32))
def test_ternary_round_trips_any_finite_update(update: Vector, seed: int) -> None:
    decoded = round_trip(update, TERNARY, seed)
    assert decoded.shape == update.shape
    assert decoded.dtype == np.float32
    assert_ternary(update, decoded)


@few
@given(
    hnp.arrays(np.float32, lengths, elements=finite),
    st.floats(0, 1, exclude_min=True, allow_nan=False),
)
def test_topk_round_trips_any_finite_update_and_fraction(update: Vector, fraction: float) -> None:
    compression = Compression("topk", fraction)
    decoded = round_trip(update, compression)
    assert decoded.shape == update.shape
    assert decoded.dtype == np.float32
    assert_top_k(update, decoded, compression)


# --- unbiasedness ---------------------------------------------------------------------------

DRAWS = 1000
SIGMAS = 6.0  # per value, over 4,100 values: a false alarm odds under 1e-5 (and seeds are fixed)


@pytest.mark.parametrize("compression", [INT8, TERNARY], ids=lambda c: c.spec)
def test_the_mean_of_many_decodes_is_the_update(compression: Compression) -> None:
    """One decode lands on one of two levels a step apart, so its error's variance is at most
    step**2 / 4 (step: the block's max/127 for int8, the block's max for ternary); the mean of
    n independent decodes errs by at most step / (2 sqrt(n)) in standard deviation."""
    update = sample(2 * BLOCK + 4, seed=3)
    rng = np.random.default_rng(7)
    total = np.zeros(len(update), dtype=np.float64)
    for _ in range(DRAWS):
        total += decode(encode(update, compression, rng=rng), compression, size=len(update))
    mean = total / DRAWS
    step = block_max(update).astype(np.float64) / (127 if compression is INT8 else 1)
    sigma = step / (2 * math.sqrt(DRAWS))
    error = mean - update
    assert (np.abs(error) <= SIGMAS * sigma + 1e-12).all()
    # and no bias hiding under the per-value noise: the errors' sum, block by block
    for start in range(0, len(update), BLOCK):
        block = slice(start, start + BLOCK)
        spread = SIGMAS * math.sqrt(float((sigma[block] ** 2).sum()))
        assert abs(float(error[block].sum())) <= spread


# --- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: c.spec)
def test_the_same_seed_gives_the_same_bytes(compression: Compression) -> None:
    update = sample(5000, seed=4)
    assert payload_of(update, compression, seed=11) == payload_of(update, compression, seed=11)


@pytest.mark.parametrize("compression", [INT8, TERNARY], ids=lambda c: c.spec)
def test_another_seed_rounds_otherwise(compression: Compression) -> None:
    update = sample(5000, seed=4)
    assert payload_of(update, compression, seed=11) != payload_of(update, compression, seed=12)


def test_topk_draws_nothing_from_the_rng() -> None:
    update = sample(5000, seed=4)
    assert payload_of(update, TOPK, seed=11) == payload_of(update, TOPK, seed=12)


# --- sizes ----------------------------------------------------------------------------------

MODEL = 650_000


@pytest.fixture(scope="module")
def model_update() -> Vector:
    return np.random.default_rng(5).standard_normal(MODEL).astype(np.float32)


def test_int8_is_four_times_smaller(model_update: Vector) -> None:
    payload = payload_of(model_update, INT8)
    assert len(payload) == _HEADER.size + 4 * -(-MODEL // BLOCK) + MODEL
    assert 3.98 < model_update.nbytes / len(payload) <= 4


def test_ternary_takes_about_1_6_bits_a_value(model_update: Vector) -> None:
    payload = payload_of(model_update, TERNARY)
    assert len(payload) == _HEADER.size + 4 * -(-MODEL // BLOCK) + -(-MODEL // 5)
    assert 8 * len(payload) / MODEL < 1.62
    assert model_update.nbytes / len(payload) > 19.5


def test_topk_at_one_percent_is_about_80_times_smaller(model_update: Vector) -> None:
    payload = payload_of(model_update, TOPK)
    assert 75 < model_update.nbytes / len(payload) < 80


# --- specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", Compression("none")),
        ("int8", Compression("int8")),
        ("ternary", Compression("ternary")),
        ("topk:0.01", Compression("topk", 0.01)),
        ("topk:1", Compression("topk", 1.0)),
        ("topk:1e-3", Compression("topk", 0.001)),
    ],
)
def test_a_spec_parses_to_its_codec(spec: str, expected: Compression) -> None:
    assert Compression.parse(spec) == expected


@pytest.mark.parametrize(
    "compression",
    [Compression(), INT8, TERNARY, TOPK, Compression("topk", 1.0), Compression("topk", 1 / 3)],
    ids=repr,
)
def test_a_codecs_spec_parses_back_to_it(compression: Compression) -> None:
    assert Compression.parse(compression.spec) == compression


@given(st.floats(0, 1, exclude_min=True, allow_nan=False))
def test_any_fraction_survives_its_spec(fraction: float) -> None:
    compression = Compression("topk", fraction)
    assert Compression.parse(compression.spec) == compression


def test_only_none_is_disabled() -> None:
    assert not Compression().enabled
    assert all(compression.enabled for compression in CODECS)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("int4", "is not one of"),
        ("", "is not one of"),
        ("INT8", "is not one of"),
        ("top-k:0.1", "is not one of"),
        ("int8:0.5", "only topk takes a fraction"),
        ("ternary:1", "only topk takes a fraction"),
        ("none:0.1", "only topk takes a fraction"),
        ("topk", "not a number"),
        ("topk:x", "not a number"),
        ("topk:0.1:0.2", "not a number"),
        ("topk:0", r"must be in \(0, 1\]"),
        ("topk:-0.1", r"must be in \(0, 1\]"),
        ("topk:1.5", r"must be in \(0, 1\]"),
        ("topk:1e-400", r"must be in \(0, 1\]"),
        ("topk:nan", r"must be in \(0, 1\]"),
        ("topk:inf", r"must be in \(0, 1\]"),
    ],
)
def test_a_bad_spec_is_a_config_error(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Compression.parse(spec)


@pytest.mark.parametrize("spec", [None, 8, 0.01, b"int8", ["int8"], Compression("int8")])
def test_a_spec_that_is_not_a_string_is_a_config_error(spec: object) -> None:
    with pytest.raises(ConfigError, match="a compression spec is a string"):
        Compression.parse(spec)


def test_a_long_bad_spec_is_not_echoed_whole() -> None:
    with pytest.raises(ConfigError) as refused:
        Compression.parse("x" * 100_000)
    assert len(str(refused.value)) < 200


def test_a_codec_out_of_its_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="is not one of"):
        Compression("gzip")  # type: ignore[arg-type]
    for fraction in (0.0, -1.0, 1.01, math.nan, math.inf):
        with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
            Compression("topk", fraction)


def test_none_has_no_payload_either_way() -> None:
    with pytest.raises(ConfigError, match="has no payload"):
        encode(np.ones(3, dtype=np.float32), Compression(), rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="has no payload"):
        decode(b"", Compression(), size=3)


# --- error feedback -------------------------------------------------------------------------


def test_feedback_adds_what_was_left_out_and_ignores_a_stale_residual() -> None:
    update = np.array([1.0, 2.0], dtype=np.float32)
    summed = with_feedback(update, np.array([0.5, -2.0], dtype=np.float32))
    np.testing.assert_array_equal(summed, np.array([1.5, 0.0], dtype=np.float32))
    assert summed.dtype == np.float32
    assert with_feedback(update, None) is update
    assert with_feedback(update, np.zeros(3, dtype=np.float32)) is update


# --- a hostile peer: the frame --------------------------------------------------------------


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: c.spec)
def test_empty_bytes_have_no_header(compression: Compression) -> None:
    with pytest.raises(ModelError, match="of 0 bytes has no header"):
        decode(b"", compression, size=10)
    with pytest.raises(ModelError, match="has no header"):
        decode(MAGIC + b"\x01", compression, size=10)


def test_a_header_alone_is_cut_short() -> None:
    with pytest.raises(ModelError, match="cut short in its scales"):
        decode(_HEADER.pack(MAGIC, 1, 10), INT8, size=10)
    with pytest.raises(ModelError, match="cut short in its scales"):
        decode(_HEADER.pack(MAGIC, 2, 10), TERNARY, size=10)
    with pytest.raises(ModelError, match="cut short in its header"):
        decode(_HEADER.pack(MAGIC, 3, 10), TOPK, size=10)


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: c.spec)
def test_a_payload_without_the_mark_is_refused(compression: Compression) -> None:
    payload = payload_of(sample(100), compression)
    with pytest.raises(ModelError, match="not a compressed update"):
        decode(b"SHC2" + payload[4:], compression, size=100)
    with pytest.raises(ModelError, match="not a compressed update"):
        decode(sample(100).tobytes(), compression, size=100)


@pytest.mark.parametrize(
    ("sent", "asked"),
    [
        (INT8, TERNARY),
        (INT8, TOPK),
        (TERNARY, INT8),
        (TERNARY, TOPK),
        (TOPK, INT8),
        (TOPK, TERNARY),
    ],
    ids=lambda c: c.spec,
)
def test_a_payload_of_another_codec_is_refused(sent: Compression, asked: Compression) -> None:
    payload = payload_of(sample(100), sent)
    with pytest.raises(ModelError, match=f"encoded {sent.kind}, the task asked for {asked.kind}"):
        decode(payload, asked, size=100)


@pytest.mark.parametrize("code", [0, 4, 255])
def test_an_unknown_codec_is_named_by_its_number(code: int) -> None:
    payload = edited(payload_of(sample(100), INT8), 4, "<B", code)
    with pytest.raises(ModelError, match=f"encoded #{code}, the task asked for int8"):
        decode(payload, INT8, size=100)


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: c.spec)
def test_a_length_other_than_the_models_is_refused(compression: Compression) -> None:
    payload = payload_of(sample(100), compression)
    with pytest.raises(ModelError, match="holds 100 values, the model has 101"):
        decode(payload, compression, size=101)
    with pytest.raises(ModelError, match="holds 100 values, the model has 0"):
        decode(payload, compression, size=0)
    lying = edited(payload, 5, "<Q", 2**64 - 1)
    with pytest.raises(ModelError, match="the model has 100"):
        decode(lying, compression, size=100)


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: c.spec)
def test_a_truncated_payload_is_refused(compression: Compression) -> None:
    payload = payload_of(sample(2049), compression)
    with pytest.raises(ModelError, match=r"take \d+ bytes, the update carries \d+"):
        decode(payload[:-1], compression, size=2049)


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: c.spec)
@pytest.mark.parametrize("extra", [b"\x00", b"\x01" * 1000])
def test_trailing_bytes_are_refused(compression: Compression, extra: bytes) -> None:
    payload = payload_of(sample(2049), compression)
    with pytest.raises(ModelError, match=r"take \d+ bytes, the update carries \d+"):
        decode(payload + extra, compression, size=2049)


# --- a hostile peer: int8 and ternary -------------------------------------------------------


@pytest.mark.parametrize("compression", [INT8, TERNARY], ids=lambda c: c.spec)
def test_truncated_scales_are_refused(compression: Compression) -> None:
    payload = payload_of(sample(2049), compression)
    with pytest.raises(ModelError, match="2049 values is cut short in its scales"):
        decode(payload[: _HEADER.size + 7], compression, size=2049)


@pytest.mark.parametrize("compression", [INT8, TERNARY], ids=lambda c: c.spec)
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, -1.0, -SUBNORMAL])
@pytest.mark.parametrize("block", [0, 1])
def test_a_scale_that_is_negative_or_not_finite_is_refused(
    compression: Compression, scale: float, block: int
) -> None:
    payload = edited(payload_of(sample(2049), compression), _HEADER.size + 4 * block, "<f", scale)
    with pytest.raises(ModelError, match="scale that is negative, not finite or over"):
        decode(payload, compression, size=2049)


@pytest.mark.parametrize("where", [0, 2048, -1])
def test_an_int8_level_of_minus_128_is_refused(where: int) -> None:
    payload = bytearray(payload_of(sample(2049), INT8))
    payload[_HEADER.size + 8 + where if where >= 0 else where] = 0x80
    with pytest.raises(ModelError, match=r"holds -128: its levels are -127\.\.127"):
        decode(bytes(payload), INT8, size=2049)


def test_the_int8_levels_127_and_minus_127_are_the_scale_both_ways() -> None:
    payload = _HEADER.pack(MAGIC, 1, 2) + struct.pack("<f", 0.5) + bytes([127, 129])
    np.testing.assert_array_equal(decode(payload, INT8, size=2), [63.5, -63.5])


@pytest.mark.parametrize("byte", [243, 250, 255])
def test_a_ternary_byte_above_242_is_refused(byte: int) -> None:
    payload = edited(payload_of(sample(2049), TERNARY), _HEADER.size + 8, "<B", byte)
    with pytest.raises(ModelError, match="a byte above 242"):
        decode(payload, TERNARY, size=2049)


def test_a_ternary_byte_of_242_is_five_plus_ones() -> None:
    payload = _HEADER.pack(MAGIC, 2, 5) + struct.pack("<f", 2.0) + bytes([242])
    np.testing.assert_array_equal(decode(payload, TERNARY, size=5), [2.0] * 5)


@pytest.mark.parametrize(("size", "digit"), [(4, 0), (4, 2), (1, 0), (2048, 2), (2049, 0)])
def test_ternary_padding_digits_must_be_zero(size: int, digit: int) -> None:
    """The last byte's digits past the last value are 1 (a zero): any other is refused."""
    payload = bytearray(payload_of(sample(size), TERNARY))
    fifth = 81  # the last byte's fifth digit, padding at all these sizes
    assert size % 5 and (payload[-1] // fifth) % 3 == 1
    payload[-1] += (digit - 1) * fifth
    with pytest.raises(ModelError, match="padding past its last value is not zero"):
        decode(bytes(payload), TERNARY, size=size)


def test_an_int8_payload_missing_a_scale_is_refused() -> None:
    payload = payload_of(sample(2049), INT8)
    cut = payload[: _HEADER.size + 4] + payload[_HEADER.size + 8 :]
    with pytest.raises(
        ModelError, match="2049 int8 values take 2049 bytes, the update carries 2045"
    ):
        decode(cut, INT8, size=2049)


def test_a_scale_that_overflows_the_levels_is_refused() -> None:
    payload = _HEADER.pack(MAGIC, 1, 2) + struct.pack("<f", 3e38) + bytes([127, 1])
    with pytest.raises(ModelError, match=r"scale|finite"):
        decode(payload, INT8, size=2)


def test_int8_round_trips_float32s_largest_value() -> None:
    update = np.array([LARGEST, -LARGEST, 1.0], dtype=np.float32)
    decoded = round_trip(update, INT8)
    assert np.isfinite(decoded).all()
    assert_int8_close(update, decoded)


# --- a hostile peer: top-k ------------------------------------------------------------------


def test_the_hand_built_topk_payload_is_the_encoders() -> None:
    """Gaps 3 and 6 code best with Rice parameter 2: quotients 0 and 1, remainders 3 and 2."""
    update = np.zeros(20, dtype=np.float32)
    update[[3, 10]] = [5.0, -7.0]
    compression = Compression("topk", 0.1)
    built = topk_payload(
        20, kept=2, rice=2, unary=[0, 1, 0], remainders=[1, 1, 1, 0], values=[5.0, -7.0]
    )
    assert payload_of(update, compression) == built
    np.testing.assert_array_equal(decode(built, compression, size=20), update)


def test_topk_with_more_values_than_the_fraction_allows_is_refused() -> None:
    payload = payload_of(sample(1000), TOPK)
    kept = TOPK.kept(1000)
    with pytest.raises(ModelError, match=f"carries {kept + 1} values, the task allows {kept}"):
        decode(edited(payload, TOPK_AT, "<Q", kept + 1), TOPK, size=1000)
    with pytest.raises(ModelError, match=f"carries {2**64 - 1} values, the task allows {kept}"):
        decode(edited(payload, TOPK_AT, "<Q", 2**64 - 1), TOPK, size=1000)
    loose = Compression("topk", 0.02)
    built = topk_payload(100, kept=3, rice=0, unary=[0, 0, 0])
    with pytest.raises(ModelError, match="carries 3 values, the task allows 2"):
        decode(built, loose, size=100)


@pytest.mark.parametrize("rice", [11, 41, 64, 255])
def test_a_rice_parameter_past_the_models_size_is_refused(rice: int) -> None:
    """No gap in 1,000 values needs more than 10 bits of remainder."""
    payload = edited(payload_of(sample(1000), TOPK), TOPK_AT + 8, "<B", rice)
    with pytest.raises(ModelError, match=f"Rice parameter {rice} is over 10"):
        decode(payload, TOPK, size=1000)


def test_a_remainder_past_the_end_of_the_model_is_refused() -> None:
    """One gap of 100 in a model of 100: quotient 1 (allowed), remainder 36."""
    payload = topk_payload(100, kept=1, rice=6, unary=[1, 0], remainders=binary(36, 6))
    with pytest.raises(ModelError, match="names a gap of 100 in 100 values"):
        decode(payload, TOPK, size=100)
    fine = topk_payload(100, kept=1, rice=6, unary=[1, 0], remainders=binary(35, 6))
    assert decode(fine, TOPK, size=100)[99] == 1


def test_positions_summing_past_the_end_of_the_model_are_refused() -> None:
    loose = Compression("topk", 0.02)
    payload = topk_payload(100, kept=2, rice=0, unary=bits([1] * 50, [0], [1] * 49, [0]))
    with pytest.raises(ModelError, match="names position 100 of a model of 100"):
        decode(payload, loose, size=100)


def test_a_quotient_past_the_end_of_the_model_is_refused() -> None:
    """A gap of 101 with Rice parameter 0: 101 ones, then the zero."""
    payload = topk_payload(100, kept=1, rice=0, unary=bits([1] * 101, [0]))
    with pytest.raises(ModelError, match="names a position past the model's 100 values"):
        decode(payload, TOPK, size=100)


def test_a_declared_unary_stream_too_long_for_the_model_is_refused_before_unpacking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payload = payload_of(sample(1000), TOPK)

    def unpack(*_: object, **__: object) -> npt.NDArray[np.uint8]:
        raise AssertionError("the unary stream was unpacked")

    monkeypatch.setattr(np, "unpackbits", unpack)
    with pytest.raises(ModelError, match=f"positions take {2**62} bytes, too many"):
        decode(edited(payload, TOPK_AT + 9, "<Q", 2**62), TOPK, size=1000)
    with pytest.raises(ModelError, match=f"positions take {2**64 - 1} bytes, too many"):
        decode(edited(payload, TOPK_AT + 9, "<Q", 2**64 - 1), TOPK, size=1000)
    # one byte more than 100 gaps can take with Rice parameter 0, and really carried
    carried = topk_payload(100, kept=1, rice=0, unary=[0], extra_unary=bytes(13))
    with pytest.raises(ModelError, match="positions take 14 bytes, too many"):
        decode(carried, TOPK, size=100)


@pytest.mark.parametrize(
    ("unary", "extra"),
    [
        (bits([1, 1, 1, 0], [0, 0, 0, 1]), b""),  # a one in the last byte's padding
        (bits([0], [0] * 7), b"\x00"),  # a whole byte of zeros past the last code
        (bits([0], [1] * 7), b""),  # ones where only padding may be
        (bits([0], [0] * 7), b"\x80"),  # a code more than the values
    ],
)
def test_unary_bits_past_the_last_code_are_refused(unary: list[int], extra: bytes) -> None:
    payload = topk_payload(100, kept=1, rice=0, unary=unary, extra_unary=extra)
    with pytest.raises(ModelError, match="positions carry bits past their last code"):
        decode(payload, TOPK, size=100)


def test_remainder_bits_past_the_last_one_are_refused() -> None:
    payload = topk_payload(100, kept=1, rice=2, unary=[0], remainders=bits([1, 1], [0] * 5, [1]))
    with pytest.raises(ModelError, match="remainders carry bits past their last one"):
        decode(payload, TOPK, size=100)
    honest = topk_payload(100, kept=1, rice=2, unary=[0], remainders=bits([1, 1], [0] * 6))
    assert decode(honest, TOPK, size=100)[3] == 1


def test_padding_bits_of_an_encoded_payload_are_refused() -> None:
    """The encoder's own payload, with a one set in the padding of each stream in turn."""
    update = np.zeros(20, dtype=np.float32)
    update[[3, 10]] = [5.0, -7.0]  # unary 010 + five bits of padding, remainders 1110 + four
    compression = Compression("topk", 0.1)
    payload = payload_of(update, compression)
    with pytest.raises(ModelError, match="positions carry bits past their last code"):
        decode(edited(payload, STREAMS_AT, "<B", 0b0100_0001), compression, size=20)
    with pytest.raises(ModelError, match="remainders carry bits past their last one"):
        decode(edited(payload, STREAMS_AT + 1, "<B", 0b1110_0001), compression, size=20)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_topk_values_that_are_not_finite_are_refused(value: float) -> None:
    honest = payload_of(sample(1000), TOPK)
    payload = edited(honest, len(honest) - 4, "<f", value)
    with pytest.raises(ModelError, match="holds a value that is not finite"):
        decode(payload, TOPK, size=1000)


def test_a_unary_stream_with_fewer_codes_than_values_is_refused() -> None:
    loose = Compression("topk", 0.02)
    payload = topk_payload(100, kept=2, rice=0, unary=[1] * 8)
    with pytest.raises(ModelError, match="positions end before its values do"):
        decode(payload, loose, size=100)
    one_short = topk_payload(100, kept=2, rice=0, unary=bits([1, 1, 0], [1] * 5))
    with pytest.raises(ModelError, match="positions end before its values do"):
        decode(one_short, loose, size=100)


def test_a_topk_header_cut_short_is_refused() -> None:
    payload = payload_of(sample(1000), TOPK)
    with pytest.raises(ModelError, match="top-k update is cut short in its header"):
        decode(payload[: STREAMS_AT - 1], TOPK, size=1000)


def test_topk_streams_cut_short_or_padded_are_refused() -> None:
    payload = payload_of(sample(1000), TOPK)
    for wrong in (payload[:STREAMS_AT], payload[:-4], payload + bytes(4)):
        with pytest.raises(ModelError, match=r"top-k positions and values take \d+ bytes"):
            decode(wrong, TOPK, size=1000)


def test_decoding_a_topk_payload_allocates_a_bounded_multiple_of_the_model() -> None:
    """A peer's largest Rice parameter for 100,000 values (17: no honest encoder picks it with
    every gap 0) makes a valid payload of under 1 MB; one past it is refused unread."""
    size = 100_000
    everything = Compression("topk", 1.0)
    too_wide = topk_payload(size, kept=size, rice=40, unary=[0] * size, remainders=[0] * 40 * size)
    with pytest.raises(ModelError, match="Rice parameter 40 is over 17"):
        decode(too_wide, everything, size=size)
    payload = topk_payload(size, kept=size, rice=17, unary=[0] * size, remainders=[0] * 17 * size)
    tracemalloc.start()
    try:
        decoded = decode(payload, everything, size=size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (decoded == 1).all()
    assert peak <= 32 * 4 * size


@pytest.mark.parametrize("compression", [INT8, TERNARY, Compression("topk", 1.0)], ids=repr)
def test_decoding_an_honest_payload_allocates_a_bounded_multiple_of_the_model(
    compression: Compression,
) -> None:
    size = 100_000
    payload = payload_of(sample(size), compression)
    tracemalloc.start()
    try:
        decode(payload, compression, size=size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 32 * 4 * size


# --- fuzzing --------------------------------------------------------------------------------


def mutations(
    payload: bytes, rng: np.random.Generator, count: int, *, spare: range = range(0)
) -> Iterator[bytes]:
    """``payload`` with bytes flipped, bits flipped, cut short or grown; never a byte in
    ``spare`` flipped."""
    editable = np.array([i for i in range(len(payload)) if i not in spare])
    for _ in range(count):
        data = bytearray(payload)
        how = int(rng.integers(4))
        if how == 0:
            for i in rng.choice(editable, int(rng.integers(1, 5))):
                data[i] ^= int(rng.integers(1, 256))
        elif how == 1:
            i = int(rng.choice(editable))
            data[i] ^= 1 << int(rng.integers(8))
        elif how == 2:
            del data[int(rng.integers(len(data))) :]
        else:
            data += rng.bytes(int(rng.integers(1, 17)))
        yield bytes(data)


def decodes_or_refuses(payload: bytes, compression: Compression, size: int) -> bool:
    """Whether ``payload`` decodes (to a finite float32 vector of ``size``) rather than being
    refused with a ModelError; anything else raised fails the test."""
    try:
        decoded = decode(payload, compression, size=size)
    except ModelError:
        return False
    assert decoded.shape == (size,)
    assert decoded.dtype == np.float32
    assert np.isfinite(decoded).all()
    return True


@pytest.mark.parametrize(
    "compression",
    [TERNARY, TOPK, Compression("topk", 0.3)],
    ids=repr,
)
@pytest.mark.parametrize("size", [1, 7, 2049])
def test_a_mangled_payload_is_refused_or_decodes_to_a_finite_vector(
    compression: Compression, size: int
) -> None:
    rng = np.random.default_rng(size)
    payload = payload_of(sample(size, seed=size), compression)
    outcomes = [
        decodes_or_refuses(mangled, compression, size) for mangled in mutations(payload, rng, 1500)
    ]
    assert not all(outcomes)


@pytest.mark.parametrize(
    "compression",
    [
        INT8,
        TERNARY,
    ],
    ids=repr,
)
def test_a_scale_of_any_exponent_is_refused_or_decodes_to_a_finite_vector(
    compression: Compression,
) -> None:
    """Every value of a scale's top byte (its sign and exponent), in front of an honest block
    of levels, whose largest is 127 (int8) or +-1 (ternary)."""
    payload = payload_of(sample(300), compression)
    for top in range(256):
        decodes_or_refuses(edited(payload, _HEADER.size + 3, "<B", top), compression, 300)


@pytest.mark.parametrize("size", [1, 7, 2049])
def test_a_mangled_int8_payload_with_its_scales_intact_is_refused_or_decodes(size: int) -> None:
    rng = np.random.default_rng(size)
    payload = payload_of(sample(size, seed=size), INT8)
    scales = range(_HEADER.size, _HEADER.size + 4 * -(-size // BLOCK))
    outcomes = [
        decodes_or_refuses(mangled, INT8, size)
        for mangled in mutations(payload, rng, 1500, spare=scales)
    ]
    assert any(outcomes)
    assert not all(outcomes)


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: c.spec)
def test_every_truncation_of_a_payload_is_refused(compression: Compression) -> None:
    payload = payload_of(sample(300), compression)
    for end in range(len(payload)):
        with pytest.raises(ModelError):
            decode(payload[:end], compression, size=300)
