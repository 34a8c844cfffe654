"""Fixed-point encoding of updates for secure aggregation: clip, stochastic rounding, mod 2^32.

Masks only cancel in a finite group, so a client's contribution becomes
integers modulo 2^32 before it is masked. The vector a client masks is

    [ quantized(w * clip(update)) ..., num_examples, quantized(w * loss) ]

with w = min(num_examples, max_weight) / max_weight in [0, 1]: the example
weight travels inside the masked vector, so the server learns only the total
weight, never one client's. Stochastic rounding keeps the sum unbiased; the
sum of up to ``max_clients`` contributions must not wrap around, which
:meth:`Quantization.check_capacity` proves at configuration time.

>>> q = Quantization(clip=1.0, bits=16, max_weight=100)
>>> encoded = q.encode(np.array([0.5, -0.25], np.float32), num_examples=100, loss=0.1,
...                    rng=np.random.default_rng(0))
>>> q.decode(encoded, count=1).weighted_sum.round(3).tolist()
[0.5, -0.25]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ConfigError, ProtocolError
from shoal.secure.crypto import BLOCK_VALUES, SEED_BYTES, Keystream

MODULUS_BITS = 32
MODULUS = 2**MODULUS_BITS
TRAILER = 2  # the two values after the update: the example count and the weighted loss
_ONE = float(2**32)  # one quantization level, in the units the rounding noise is added in

Encoded = npt.NDArray[np.uint32]


@dataclass(frozen=True, slots=True)
class DecodedSum:
    """The dequantized sum of several contributions."""

    weighted_sum: npt.NDArray[np.float64]  # sum of w_i * clip(update_i)
    total_weight: float  # sum of w_i
    num_examples: int  # sum of the clients' example counts
    weighted_loss: float  # sum of w_i * clip(loss_i)

    def mean(self) -> npt.NDArray[np.float32]:
        """The weighted mean update; zero weight means nothing to average."""
        if self.total_weight <= 0:
            raise ProtocolError("the secure sum carries zero total weight")
        return (self.weighted_sum / self.total_weight).astype(np.float32)

    def mean_loss(self) -> float | None:
        return self.weighted_loss / self.total_weight if self.total_weight > 0 else None


@dataclass(frozen=True, slots=True)
class Quantization:
    """How updates become integers: clipping range, bits per value, the weight's scale."""

    clip: float = 4.0
    bits: int = 20
    max_weight: int = 10_000
    loss_clip: float = 100.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secure_aggregation.clip must be positive, got {self.clip}")
        if not 1 <= self.bits <= MODULUS_BITS - 1:
            raise ConfigError(
                f"secure_aggregation.bits must be in [1, {MODULUS_BITS - 1}], got {self.bits}"
            )
        if self.max_weight < 1:
            raise ConfigError(f"secure_aggregation.max_weight must be >= 1, got {self.max_weight}")
        if not (math.isfinite(self.loss_clip) and self.loss_clip > 0):
            raise ConfigError(
                f"secure_aggregation.loss_clip must be positive, got {self.loss_clip}"
            )

    @property
    def levels(self) -> int:
        """The largest quantized value of one coordinate."""
        return (1 << self.bits) - 1

    def check_capacity(self, max_clients: int) -> None:
        """Refuse settings whose sum over ``max_clients`` could wrap modulo 2^32."""
        largest = max(self.levels, self.max_weight)
        if max_clients * largest >= MODULUS:
            fitting_bits = math.floor(math.log2(MODULUS / max(max_clients, 1) + 1))
            raise ConfigError(
                f"secure aggregation would overflow: {max_clients} clients x {largest} "
                f"(the largest value of one contribution) must stay below 2^{MODULUS_BITS}; "
                f"lower secure_aggregation.bits to at most {min(fitting_bits, self.bits - 1)}, "
                "or select fewer clients per round"
            )

    def fitted(self, max_clients: int) -> Quantization:
        """The same settings with the most bits a sum over ``max_clients`` allows."""
        bits = MODULUS_BITS - 1
        while bits > 1 and max_clients * (2**bits - 1) >= MODULUS:
            bits -= 1
        fitted = dataclasses.replace(self, bits=bits)
        fitted.check_capacity(max_clients)
        return fitted

    def step(self) -> float:
        """The width of one quantization step of the update coordinates."""
        return 2 * self.clip / self.levels

    def error_bound(self, count: int) -> float:
        """The largest error of one coordinate of a sum of ``count`` contributions."""
        return count * self.step()

    def weight(self, num_examples: int) -> float:
        return min(num_examples, self.max_weight) / self.max_weight

    def encode(
        self,
        update: npt.NDArray[np.floating],
        *,
        num_examples: int,
        loss: float,
        rng: np.random.Generator,
    ) -> Encoded:
        """One client's contribution as uint32 values, ready to mask.

        The rounding noise is the AES-CTR keystream of a key of 256 bits drawn
        from ``rng`` (so it is as reproducible as ``rng``): 32 random bits a
        value, in a third of the time numpy's own generator takes.
        """
        if update.ndim != 1:
            raise ProtocolError(f"an update must be 1-D, got shape {update.shape}")
        if not num_examples > 0:
            raise ProtocolError(f"num_examples must be positive, got {num_examples}")
        size, weight = update.size, self.weight(num_examples)
        noise = Keystream(rng.bytes(SEED_BYTES))
        factor = weight * self.levels / (2 * self.clip) * _ONE  # (w x + clip) L / (2 clip)
        centre = self.levels / 2 * _ONE
        highest = self.clip * factor + centre  # what the largest value clips to, computed alike
        encoded = np.empty(size + TRAILER, dtype=np.uint32)
        scratch = np.empty(min(size, BLOCK_VALUES), dtype=np.float64)
        for start in range(0, size, BLOCK_VALUES):  # in blocks that stay in the cache
            stop = min(start + BLOCK_VALUES, size)
            values = scratch[: stop - start]
            np.copyto(values, update[start:stop])
            np.clip(values, -self.clip, self.clip, out=values)
            np.multiply(values, factor, out=values)
            np.add(values, centre, out=values)
            block = encoded[start:stop]
            _stochastic_round(values, noise, out=block, largest=self.levels, highest=highest)
        encoded[size] = min(num_examples, self.max_weight)
        loss_value = min(max(loss, 0.0), self.loss_clip) if math.isfinite(loss) else self.loss_clip
        loss_scaled = np.array([weight * loss_value * self.levels / self.loss_clip * _ONE])
        _stochastic_round(loss_scaled, noise, out=encoded[size + 1 :], largest=self.levels)
        return encoded

    def decode(self, total: Encoded, *, count: int) -> DecodedSum:
        """The dequantized sum of ``count`` contributions from their modular sum."""
        if total.ndim != 1 or total.size < TRAILER:
            raise ProtocolError(f"a quantized sum needs at least {TRAILER} values")
        # the sum minus its centre, count * L / 2, read as a signed number modulo 2^32: noise
        # added after quantization may push a coordinate below 0 or past L, and still decodes.
        # Twice that, 2 total - count L, lies in [-2^32, 2^32); with count L = 2 half + odd it
        # is 2 d - odd, where d = total - half wraps in uint32 and reads as int32 (one pass)
        half, odd = divmod(count * self.levels, 2)
        difference = np.subtract(total[:-TRAILER], np.uint32(half % MODULUS), dtype=np.uint32)
        signed = difference.view(np.int32)
        weighted_sum = np.multiply(signed, 2.0, dtype=np.float64)
        if odd:
            weighted_sum -= 1.0
            weighted_sum[signed == np.iinfo(np.int32).min] = MODULUS - 1  # d = 2^31, not -2^31
        weighted_sum *= self.clip / self.levels
        num_examples = int(total[-2])
        return DecodedSum(
            weighted_sum=weighted_sum,
            total_weight=num_examples / self.max_weight,
            num_examples=num_examples,
            weighted_loss=float(total[-1]) * self.loss_clip / self.levels,
        )


def _stochastic_round(
    scaled: npt.NDArray[np.float64],
    noise: Keystream,
    *,
    out: Encoded,
    largest: int,
    highest: float = math.inf,
) -> None:
    """Round values given in units of 2^-32 of a step (all >= 0) down or up, into ``out``.

    Up with the probability of the fractional part, so the expectation is
    exact: floor(x + U) for U uniform on [0, 1) with 32 random bits.
    ``scaled`` is overwritten. The result never exceeds ``largest``: at x =
    ``largest`` itself a sum rounded in float64 could reach the next
    integer, and the capacity of the modular sum counts on that bound. The
    pass that enforces it is skipped when no value exceeds ``highest`` and
    that bound alone keeps them below: a client that weighs less than the
    most has values well below ``largest``.
    """
    np.add(scaled, noise.read(scaled.size), out=scaled)
    np.multiply(scaled, 1 / _ONE, out=scaled)  # a power of two: exact
    if not _below(highest, largest + 1):  # only then can a rounded sum reach largest + 1
        np.minimum(scaled, largest, out=scaled)
    # truncation is floor, the values being >= 0; they are below 2^31, and int32 is the cast
    # the processor does in one instruction (a NaN becomes 2^31 as with uint32)
    np.copyto(out.view(np.int32), scaled, casting="unsafe")


def _below(highest: float, bound: int) -> bool:
    """Whether every value up to ``highest``, with the rounding noise added, stays below
    ``bound`` once scaled: float64 addition is monotonic, so the largest value with the
    largest noise bounds them all."""
    return (highest + (_ONE - 1)) / _ONE < bound


def modular_sum(vectors: list[Encoded] | tuple[Encoded, ...]) -> Encoded:
    """Sum uint32 vectors modulo 2^32 (numpy's uint32 arithmetic wraps)."""
    if not vectors:
        raise ProtocolError("nothing to sum")
    total = vectors[0].copy()
    for vector in vectors[1:]:
        np.add(total, vector, out=total)
    return total
