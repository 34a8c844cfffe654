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

MODULUS_BITS = 32
MODULUS = 2**MODULUS_BITS
TRAILER = 2  # the two values after the update: the example count and the weighted loss

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
        """One client's contribution as uint32 values, ready to mask."""
        if update.ndim != 1:
            raise ProtocolError(f"an update must be 1-D, got shape {update.shape}")
        if not num_examples > 0:
            raise ProtocolError(f"num_examples must be positive, got {num_examples}")
        weight = self.weight(num_examples)
        scaled = update.astype(np.float64)
        np.clip(scaled, -self.clip, self.clip, out=scaled)
        scaled *= weight * self.levels / (2 * self.clip)  # (w x + clip) L / (2 clip)
        scaled += self.levels / 2
        loss_value = min(max(loss, 0.0), self.loss_clip) if math.isfinite(loss) else self.loss_clip
        encoded = np.empty(update.size + TRAILER, dtype=np.uint32)
        encoded[: update.size] = _stochastic_round(scaled, rng)
        encoded[update.size] = min(num_examples, self.max_weight)
        encoded[update.size + 1] = _stochastic_round(
            np.array([weight * loss_value * self.levels / self.loss_clip], dtype=np.float64), rng
        )[0]
        return encoded

    def decode(self, total: Encoded, *, count: int) -> DecodedSum:
        """The dequantized sum of ``count`` contributions from their modular sum."""
        if total.ndim != 1 or total.size < TRAILER:
            raise ProtocolError(f"a quantized sum needs at least {TRAILER} values")
        # the sum minus its centre, count * L / 2, read as a signed number modulo 2^32: noise
        # added after quantization may push a coordinate below 0 or past L, and still decodes
        twice = 2 * total[:-TRAILER].astype(np.int64) - count * self.levels
        twice = (twice + MODULUS) % (2 * MODULUS) - MODULUS
        weighted_sum = twice.astype(np.float64) * (self.clip / self.levels)
        num_examples = int(total[-2])
        return DecodedSum(
            weighted_sum=weighted_sum,
            total_weight=num_examples / self.max_weight,
            num_examples=num_examples,
            weighted_loss=float(total[-1]) * self.loss_clip / self.levels,
        )


def _stochastic_round(values: npt.NDArray[np.float64], rng: np.random.Generator) -> Encoded:
    """Round down or up with the probability that makes the expectation exact (in place)."""
    values += rng.random(values.shape, dtype=np.float32)  # floor(x + U[0, 1)) rounds x up
    np.floor(values, out=values)  # with probability frac(x); 24 random bits are plenty
    return values.astype(np.uint32)


def modular_sum(vectors: list[Encoded] | tuple[Encoded, ...]) -> Encoded:
    """Sum uint32 vectors modulo 2^32 (numpy's uint32 arithmetic wraps)."""
    if not vectors:
        raise ProtocolError("nothing to sum")
    total = vectors[0].copy()
    for vector in vectors[1:]:
        np.add(total, vector, out=total)
    return total
