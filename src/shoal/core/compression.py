"""Lossy codecs for a client's update on its way up: 8-bit and ternary quantization, top-k
sparsification with Golomb-Rice coded positions.

Uploads are the bottleneck of cross-device FL: a phone's uplink is a fraction of its
downlink, and every selected client sends a whole model's worth of floats each round. A
codec turns the flat float32 update into far fewer bytes, and the coordinator turns those
bytes back into a dense vector of the model's size before anything judges or counts it (the
policy engine, clipping, the aggregate all see what the client's bytes say):

- ``int8``: each block of :data:`BLOCK` values scaled by its largest magnitude and rounded
  stochastically to -127..127 (unbiased: the expected decoded value is the value itself);
  8 bits a value, 4x smaller than float32.
- ``ternary`` (TernGrad): each value becomes -1, 0 or +1 times its block's largest
  magnitude, +-1 with the probability that keeps it unbiased; five values a byte in base 3,
  1.6 bits a value, 20x smaller.
- ``topk``: the ``fraction`` of values largest in magnitude, their positions as the gaps
  between them in a Golomb-Rice code (the parameter chosen for the fewest bits) and their
  values as float32; the rest are 0. Biased: a client keeps what it left out and adds it
  to its next update (error feedback, :func:`with_feedback`).

A payload names its codec and the update's length; :func:`decode` takes bytes from a peer and
refuses anything but the exact encoding of a vector of the expected length (a wrong codec or
length, a truncated or padded payload, a position out of range or repeated, a scale that is
not finite, more values than the fraction allows), each with one line saying what.

>>> compression = Compression("int8")
>>> update = np.linspace(-1, 1, 5000, dtype=np.float32)
>>> payload = encode(update, compression, rng=np.random.default_rng(0))
>>> len(payload) < len(update.tobytes()) / 3.9
True
>>> bool(np.abs(decode(payload, compression, size=5000) - update).max() <= 1 / 127)
True
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ConfigError, ModelError
from shoal.core.parameters import Vector

Kind = Literal["none", "int8", "ternary", "topk"]
KINDS: tuple[Kind, ...] = ("none", "int8", "ternary", "topk")

BLOCK = 2048
"""Values per scale of the quantizing codecs: a scale (4 bytes) per 2,048 values costs 0.2%
of an int8 payload, and keeps one large value from flattening a whole model's others."""
EXTRAS_KEY = "upload_codec"
"""The fit task's extras key naming the codec its client uploads with
(:attr:`Compression.spec`): the coordinator's setting, over anything the server app's round
config says."""
MAGIC = b"SHC1"
_HEADER = struct.Struct("<4sBQ")  # magic, codec, the update's length
_TOPK_HEADER = struct.Struct("<QBQ")  # values kept, Rice parameter, bytes of the quotients
_CODES: dict[str, int] = {"int8": 1, "ternary": 2, "topk": 3}
_TRITS_PER_BYTE = 5
_TRIT_WEIGHTS = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class Compression:
    """A codec and its setting: what a fit task asks its client to upload (``spec``)."""

    kind: Kind = "none"
    fraction: float = 0.01  # topk: the share of values kept

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"compression {self.kind!r} is not one of {', '.join(KINDS)}")
        if not 0 < self.fraction <= 1 or not math.isfinite(self.fraction):
            raise ConfigError(f"compression.fraction must be in (0, 1], got {self.fraction}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def spec(self) -> str:
        """The codec as a task's extras carry it: ``int8``, ``ternary``, ``topk:0.01``."""
        return f"topk:{self.fraction!r}" if self.kind == "topk" else self.kind

    @classmethod
    def parse(cls, spec: object) -> Compression:
        """The codec a task's ``spec`` names; a :class:`ConfigError` for anything else."""
        if not isinstance(spec, str):
            raise ConfigError(f"a compression spec is a string, got {type(spec).__name__}")
        kind, _, fraction = spec.partition(":")
        if kind not in KINDS:
            raise ConfigError(f"compression {spec[:40]!r} is not one of {', '.join(KINDS)}")
        if kind != "topk":
            if fraction:
                raise ConfigError(f"compression {spec[:40]!r}: only topk takes a fraction")
            return cls(kind)
        try:
            return cls("topk", float(fraction))
        except ValueError:
            raise ConfigError(f"compression {spec[:40]!r}: the fraction is not a number") from None

    def payload_size(self, size: int) -> int:
        """The bytes of the payload of an update of ``size`` values: exact for the quantizing
        codecs; for ``topk``, the positions' part as evenly spread positions code (what a
        simulated upload takes on its device's link before it is made)."""
        scales = 4 * -(-size // BLOCK)
        if self.kind == "int8":
            return _HEADER.size + scales + size
        if self.kind == "ternary":
            return _HEADER.size + scales + -(-size // _TRITS_PER_BYTE)
        if self.kind == "topk":
            kept = self.kept(size)
            rice = max(0, int(math.log2(size / kept))) if kept else 0
            code_bits = (size >> rice) + kept * (1 + rice)
            return _HEADER.size + _TOPK_HEADER.size + -(-code_bits // 8) + 4 * kept
        return 4 * size  # the update as it is (its tensors' header aside)

    def kept(self, size: int) -> int:
        """How many values ``topk`` keeps of ``size`` (at least one of a non-empty update)."""
        return min(size, max(1, math.ceil(self.fraction * size))) if size else 0


def encode(update: Vector, compression: Compression, *, rng: np.random.Generator) -> bytes:
    """``update`` (float32, finite) as ``compression``'s payload; ``rng`` draws the
    stochastic rounding of the quantizing codecs."""
    if not compression.enabled:
        raise ConfigError("compression 'none' has no payload: upload the update as it is")
    values = np.ascontiguousarray(update, dtype=np.float32)
    header = _HEADER.pack(MAGIC, _CODES[compression.kind], len(values))
    if compression.kind == "int8":
        return header + _encode_int8(values, rng)
    if compression.kind == "ternary":
        return header + _encode_ternary(values, rng)
    return header + _encode_topk(values, compression.kept(len(values)))


def decode(payload: bytes, compression: Compression, *, size: int) -> Vector:
    """The dense float32 vector of ``size`` values that ``payload`` encodes with
    ``compression``; a :class:`ModelError` naming what is wrong with anything else."""
    if not compression.enabled:
        raise ConfigError("compression 'none' has no payload to decode")
    if len(payload) < _HEADER.size:
        raise ModelError(f"a compressed update of {len(payload)} bytes has no header")
    magic, code, length = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise ModelError("not a compressed update (its first bytes are not the codec's mark)")
    if code != _CODES[compression.kind]:
        named = next((kind for kind, value in _CODES.items() if value == code), f"#{code}")
        raise ModelError(f"the update is encoded {named}, the task asked for {compression.kind}")
    if length != size:
        raise ModelError(f"the update holds {length} values, the model has {size}")
    body = memoryview(payload)[_HEADER.size :]
    if compression.kind == "int8":
        return _decode_int8(body, size)
    if compression.kind == "ternary":
        return _decode_ternary(body, size)
    return _decode_topk(body, size, most=compression.kept(size))


def rescaled(payload: bytes, compression: Compression, *, factor: float) -> bytes:
    """``payload`` (made by :func:`encode`) decoding to ``factor`` (0 to 1) times what it
    decoded to: its scales, or its top-k values, times ``factor``; nothing else changes (a
    client clipping what it sends to a DP clip norm, past the codec's rounding)."""
    if not 0 <= factor <= 1:
        raise ValueError(f"a payload is scaled down, by 0 to 1, not {factor}")
    _, _, size = _HEADER.unpack_from(payload)
    if compression.kind == "topk":
        (kept, _, _) = _TOPK_HEADER.unpack_from(payload, _HEADER.size)
        start = len(payload) - 4 * kept
        part = slice(start, len(payload))
    else:
        start = _HEADER.size
        part = slice(start, start + 4 * -(-size // BLOCK))
    values = np.frombuffer(payload[part], dtype="<f4") * np.float32(factor)
    return payload[:start] + values.astype("<f4").tobytes() + payload[part.stop :]


def with_feedback(update: Vector, residual: Vector | None) -> Vector:
    """``update`` plus what the client's earlier compressed uploads left out (error
    feedback): a value too small to be sent this round adds up until it is."""
    if residual is None or residual.shape != update.shape:
        return update
    return np.add(update, residual, dtype=np.float32)


# --- blocks of scaled values --------------------------------------------------------------


def _block_scales(values: Vector) -> Vector:
    """The largest magnitude of each block of :data:`BLOCK` values."""
    blocks = -(-len(values) // BLOCK)
    padded = np.zeros(blocks * BLOCK, dtype=np.float32)
    np.abs(values, out=padded[: len(values)])
    scales: Vector = padded.reshape(blocks, BLOCK).max(axis=1)
    return scales


def _largest_int8_scale() -> np.float32:
    """The largest float32 scale whose level 127 is still a finite float32."""
    largest = float(np.finfo(np.float32).max)
    scale = np.float32(largest / 127)
    while float(scale) * 127 > largest:
        scale = np.nextafter(scale, np.float32(0))
    return scale


_MAX_INT8_SCALE = _largest_int8_scale()


def _per_value(scales: Vector, size: int) -> Vector:
    return np.repeat(scales, BLOCK)[:size]


def _read_scales(
    body: memoryview, size: int, *, largest: float = float(np.finfo(np.float32).max)
) -> tuple[Vector, memoryview]:
    """The block scales at the head of ``body`` (each finite, 0 to ``largest``: a value they
    scale stays a finite float32), and the rest of it."""
    blocks = -(-size // BLOCK)
    if len(body) < 4 * blocks:
        raise ModelError(f"a compressed update of {size} values is cut short in its scales")
    scales = np.frombuffer(body[: 4 * blocks], dtype="<f4").astype(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all() and (scales <= largest).all()):
        raise ModelError(
            f"a compressed update holds a scale that is negative, not finite or over {largest:.4g}"
        )
    return scales, body[4 * blocks :]


def _exactly(body: memoryview, expected: int, what: str) -> None:
    if len(body) != expected:
        raise ModelError(f"{what} take {expected} bytes, the update carries {len(body)}")


def _encode_int8(values: Vector, rng: np.random.Generator) -> bytes:
    # float32's largest values scale to past 127 and are clipped there: never to infinity
    scales: Vector = np.minimum(_block_scales(values) / np.float32(127), _MAX_INT8_SCALE)
    per_value = _per_value(scales, len(values))
    scaled = np.divide(values, per_value, out=np.zeros_like(values), where=per_value > 0)
    rounded = np.floor(scaled + rng.random(len(values), dtype=np.float32))
    levels = np.clip(rounded, -127, 127).astype(np.int8)
    return scales.astype("<f4").tobytes() + levels.tobytes()


def _decode_int8(body: memoryview, size: int) -> Vector:
    scales, rest = _read_scales(body, size, largest=float(_MAX_INT8_SCALE))
    _exactly(rest, size, f"{size} int8 values")
    levels = np.frombuffer(rest, dtype=np.int8)
    if (levels == -128).any():
        raise ModelError("an int8 update holds -128: its levels are -127..127")
    decoded: Vector = levels.astype(np.float32) * _per_value(scales, size)
    return decoded


def _encode_ternary(values: Vector, rng: np.random.Generator) -> bytes:
    scales = _block_scales(values)
    per_value = _per_value(scales, len(values))
    chance = np.divide(np.abs(values), per_value, out=np.zeros_like(values), where=per_value > 0)
    signs = np.sign(values).astype(np.int8) * (rng.random(len(values)) < chance)
    digits = np.ones(-(-len(values) // _TRITS_PER_BYTE) * _TRITS_PER_BYTE, dtype=np.uint8)
    digits[: len(values)] += signs.astype(np.uint8)  # -1, 0, +1 as 0, 1, 2 (wrapping)
    weighted = digits.reshape(-1, _TRITS_PER_BYTE) * _TRIT_WEIGHTS
    packed: npt.NDArray[np.uint8] = weighted.sum(axis=1, dtype=np.uint8)
    return scales.astype("<f4").tobytes() + packed.tobytes()


def _decode_ternary(body: memoryview, size: int) -> Vector:
    scales, rest = _read_scales(body, size)
    _exactly(rest, -(-size // _TRITS_PER_BYTE), f"{size} ternary values")
    packed = np.frombuffer(rest, dtype=np.uint8)
    if (packed > 242).any():
        raise ModelError("a ternary update holds a byte above 242 (five base-3 digits)")
    digits = (packed[:, None] // _TRIT_WEIGHTS) % 3
    flat = digits.reshape(-1)
    if (flat[size:] != 1).any():
        raise ModelError("a ternary update's padding past its last value is not zero")
    decoded: Vector = (flat[:size].astype(np.float32) - 1) * _per_value(scales, size)
    return decoded


# --- the largest values, their positions Golomb-Rice coded --------------------------------


def _encode_topk(values: Vector, kept: int) -> bytes:
    if kept == 0:
        return _TOPK_HEADER.pack(0, 0, 0)
    magnitudes = np.abs(values)
    positions = np.sort(np.argpartition(magnitudes, len(values) - kept)[len(values) - kept :])
    gaps = np.diff(positions, prepend=-1).astype(np.int64) - 1
    rice = _best_rice(gaps)
    unary, remainders = _rice_encode(gaps, rice)
    chosen = values[positions].astype("<f4")
    header = _TOPK_HEADER.pack(kept, rice, len(unary))
    return header + unary + remainders + chosen.tobytes()


def _best_rice(gaps: npt.NDArray[np.int64]) -> int:
    """The Rice parameter that codes ``gaps`` in the fewest bits."""
    largest = int(gaps.max()) if len(gaps) else 0
    candidates = range(largest.bit_length() + 1)
    costs = [int((gaps >> r).sum()) + len(gaps) * (1 + r) for r in candidates]
    return int(np.argmin(costs))


def _rice_encode(gaps: npt.NDArray[np.int64], rice: int) -> tuple[bytes, bytes]:
    """Each gap's Rice code, its two parts in two streams: the quotients by ``2**rice`` in
    unary (ones, then a zero), then the remainders in ``rice`` bits each, most significant
    first; each stream padded with zeros to a byte. The bits of a Rice code, reordered so
    that both parts decode without walking the codes one by one."""
    quotients = gaps >> rice
    unary = np.ones(int(quotients.sum()) + len(gaps), dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 0
    shifts = np.arange(rice - 1, -1, -1, dtype=np.int64)
    remainder_bits = ((gaps[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(unary).tobytes(), np.packbits(remainder_bits.reshape(-1)).tobytes()


def _decode_topk(body: memoryview, size: int, *, most: int) -> Vector:
    if len(body) < _TOPK_HEADER.size:
        raise ModelError("a top-k update is cut short in its header")
    kept, rice, unary_bytes = _TOPK_HEADER.unpack_from(body)
    if kept > most:
        raise ModelError(f"a top-k update carries {kept} values, the task allows {most}")
    if rice > size.bit_length():  # no gap within the model needs more remainder bits
        raise ModelError(f"a top-k update's Rice parameter {rice} is over {size.bit_length()}")
    if unary_bytes > -(-((size >> rice) + kept) // 8):  # gaps summing past the model
        raise ModelError(f"a top-k update's positions take {unary_bytes} bytes, too many")
    rest = body[_TOPK_HEADER.size :]
    remainder_bytes = -(-kept * rice // 8)
    _exactly(rest, unary_bytes + remainder_bytes + 4 * kept, f"{kept} top-k positions and values")
    positions = _rice_positions(
        rest[:unary_bytes], rest[unary_bytes : unary_bytes + remainder_bytes], kept, rice, size
    )
    chosen = np.frombuffer(rest[unary_bytes + remainder_bytes :], dtype="<f4").astype(np.float32)
    if not np.isfinite(chosen).all():
        raise ModelError("a top-k update holds a value that is not finite")
    decoded = np.zeros(size, dtype=np.float32)
    decoded[positions] = chosen
    return decoded


def _rice_positions(
    unary: memoryview, remainders: memoryview, kept: int, rice: int, size: int
) -> npt.NDArray[np.int64]:
    """The ``kept`` positions (strictly increasing, below ``size``) that the two streams of
    Rice-coded gaps name; every bit used but each stream's last byte's zero padding."""
    bits = np.unpackbits(np.frombuffer(unary, dtype=np.uint8))
    stops = np.flatnonzero(bits == 0)[:kept]
    if len(stops) < kept:
        raise ModelError("a top-k update's positions end before its values do")
    end = int(stops[-1]) + 1 if kept else 0
    if len(bits) - end >= 8 or bits[end:].any():
        raise ModelError("a top-k update's positions carry bits past their last code")
    quotients = np.diff(stops, prepend=-1) - 1
    if kept and int(quotients.max()) > size >> rice:
        raise ModelError(f"a top-k update names a position past the model's {size} values")
    remainder_bits = np.unpackbits(np.frombuffer(remainders, dtype=np.uint8))
    if remainder_bits[kept * rice :].any():
        raise ModelError("a top-k update's remainders carry bits past their last one")
    codes = remainder_bits[: kept * rice].reshape(kept, rice)
    gaps = quotients << rice
    for bit in range(rice):  # a column at a time: no int64 matrix of kept x rice
        gaps |= codes[:, bit].astype(np.int64) << (rice - 1 - bit)
    if kept and int(gaps.max()) >= size:
        raise ModelError(f"a top-k update names a gap of {int(gaps.max())} in {size} values")
    positions: npt.NDArray[np.int64] = np.cumsum(gaps + 1) - 1  # below kept * size: no wrap
    if kept and int(positions[-1]) >= size:
        raise ModelError(f"a top-k update names position {positions[-1]} of a model of {size}")
    return positions
