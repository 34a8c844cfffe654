"""Record-level DP-SGD on the client: its settings, Poisson batches, the noised gradient, epsilon.

DP-SGD (Abadi et al. 2016) bounds what one training *record* can change in
a client's local training, where user-level DP (``shoal.privacy``) bounds
what one client can change in the global model. At every step:

1. each example joins the batch independently with probability ``q``
   (Poisson sampling, the sampling that the RDP analysis assumes);
2. each example's gradient is clipped to L2 norm ``C``;
3. the clipped gradients are summed and ``N(0, (z C)^2)`` is added to every
   coordinate;
4. the sum is divided by the *expected* batch size ``q N`` (a fixed
   denominator, so the batch's actual size leaks nothing).

Weight decay and FedProx's proximal term do not depend on the data: they
are added after the noise, at no privacy cost. A client reports the
``(q, z, steps)`` it ran (:func:`dp_sgd_metrics`) so that the coordinator's
accountant can compose them; :func:`record_level_epsilon` gives the
epsilon of one client's fit with Google's ``dp-accounting`` (RDP).

Randomness, both the Poisson sampling and the noise, comes from a
:class:`~shoal.privacy.noise.NoiseSource`: in secure mode (the default) the
AES-256-CTR keystream of a fresh key from the OS CSPRNG, since Opacus'
``secure_mode`` needs ``torchcsprng``, which cannot be installed here. With
``secure=False`` it comes from the training's seeded generator, which makes
tests reproducible and warns with ``InsecureNoiseWarning``. The Gaussians
are floating-point (Box-Muller on 53-bit uniforms): the DP proof assumes
real-valued noise, and no defence against floating-point attacks on the
low-order bits (Mironov 2012) is applied here.

>>> settings = DpSgdSettings(clip_norm=1.0, noise_multiplier=1.1)
>>> settings.secure
True
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ClientError, ConfigError
from shoal.privacy.accounting import PrivacyAccountant
from shoal.privacy.noise import NoiseSource

FloatArray = npt.NDArray[np.floating[Any]]
IndexArray = npt.NDArray[np.intp]
LabelArray = npt.NDArray[np.int64]


@runtime_checkable
class PerExampleGradientModel(Protocol):
    """A NumPy model that DP-SGD can train: per-example gradients, weight decay apart.

    ``per_example_gradients`` gives the batch's mean loss and one row (n, P)
    per example, the gradient of that example's own loss, without weight
    decay; ``add_weight_decay_`` adds weight decay's gradient in place and
    returns its penalty.
    """

    def per_example_gradients(
        self, vector: FloatArray, x: FloatArray, y: LabelArray
    ) -> tuple[float, FloatArray]: ...

    def add_weight_decay_(self, vector: FloatArray, gradient: FloatArray) -> float: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DpSgdSettings:
    """Record-level DP-SGD for one client: clip norm ``C``, noise multiplier ``z``, delta.

    ``secure`` (the default) draws the sampling and the noise from a CSPRNG;
    ``secure=False`` draws them from the fit's seeded generator, for
    reproducible tests only (it warns). ``delta`` is the delta at which a
    client that computes its own epsilon reports it.
    """

    clip_norm: float
    noise_multiplier: float
    secure: bool = True
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError(f"dp_sgd clip_norm must be a finite number > 0, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(
                f"dp_sgd noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}"
            )
        if not math.isfinite(self.noise_multiplier * self.clip_norm):
            raise ConfigError("dp_sgd noise_multiplier * clip_norm overflows")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp_sgd delta must lie in (0, 1), got {self.delta}")

    def noise_source(self, rng: np.random.Generator) -> NoiseSource:
        """The CSPRNG source in secure mode; otherwise ``rng`` itself (warns)."""
        return NoiseSource.secure() if self.secure else NoiseSource.seeded(rng)


def poisson_sampling_rate(*, num_examples: int, batch_size: int) -> float:
    """``q = batch_size / num_examples``, capped at 1; ``batch_size`` 0 means full batch."""
    if num_examples < 1:
        raise ConfigError(f"DP-SGD needs at least one example, got {num_examples}")
    if batch_size < 0:
        raise ConfigError(f"batch_size must be >= 0 (0 is full batch), got {batch_size}")
    batch = num_examples if batch_size == 0 else min(batch_size, num_examples)
    return batch / num_examples


class PoissonBatches:
    """``num_batches`` Poisson-sampled batches of example indices.

    Each example joins each batch with probability ``sampling_rate``,
    independently, so batches vary in size and may be empty. Iterable and
    sized, so a PyTorch ``DataLoader`` takes it as its ``batch_sampler``.
    """

    def __init__(
        self, *, num_examples: int, sampling_rate: float, num_batches: int, noise: NoiseSource
    ) -> None:
        if not 0 < sampling_rate <= 1:
            raise ConfigError(f"a sampling rate must lie in (0, 1], got {sampling_rate}")
        if num_examples < 0 or num_batches < 0:
            raise ConfigError("num_examples and num_batches must be >= 0")
        self.num_examples = num_examples
        self.sampling_rate = sampling_rate
        self.num_batches = num_batches
        self.noise = noise

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            yield self.draw().tolist()

    def draw(self) -> IndexArray:
        """The sorted indices of one batch."""
        if self.sampling_rate == 1:
            return np.arange(self.num_examples)
        return np.flatnonzero(self.noise.uniform(self.num_examples) < self.sampling_rate)


def per_example_clip_factors(
    per_example: FloatArray, *, clip_norm: float
) -> npt.NDArray[np.float64]:
    """``min(1, C / ||g_i||)`` for each row ``g_i``: exactly 1 for rows within the bound."""
    norms = np.sqrt(np.einsum("ij,ij->i", per_example, per_example, dtype=np.float64))
    factors: npt.NDArray[np.float64] = clip_norm / np.maximum(norms, clip_norm)
    return factors


def dp_sgd_gradient(
    per_example: FloatArray,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    noise: NoiseSource,
) -> npt.NDArray[np.float64]:
    """``(sum_i clip(g_i) + N(0, (z C)^2 I)) / expected_batch_size`` for rows ``g_i`` (n, P).

    An empty batch (n = 0) gives pure noise, as DP-SGD requires.

    >>> rows = np.array([[30.0, 40.0], [0.3, 0.4]])  # norms 50 and 0.5
    >>> dp_sgd_gradient(rows, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=2,
    ...                 noise=NoiseSource.secure())
    array([0.45, 0.6 ])
    """
    if per_example.ndim != 2:
        raise ConfigError(f"per-example gradients must be (examples, P), got {per_example.shape}")
    if not expected_batch_size > 0:
        raise ConfigError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    factors = per_example_clip_factors(per_example, clip_norm=clip_norm)
    total: npt.NDArray[np.float64] = factors @ per_example.astype(np.float64, copy=False)
    if noise_multiplier > 0:
        total += noise.normal(total.size, std=noise_multiplier * clip_norm)
    total /= expected_batch_size
    return total


def dp_sgd_training(
    model: PerExampleGradientModel,
    start: FloatArray,
    x: FloatArray,
    y: LabelArray,
    *,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float,
    settings: DpSgdSettings,
    rng: np.random.Generator,
) -> tuple[FloatArray, float]:
    """``num_steps`` DP-SGD steps from the vector ``start``: (the new vector, the mean loss).

    Batches are Poisson-sampled at ``q = batch_size / n`` (0: full batch)
    and the noised sum is divided by ``q n``. The FedProx term pulls toward
    ``start``. The loss (weight decay included) is averaged over the batches
    that drew examples, 0.0 if none did. Raises :class:`ClientError` when
    training diverges.
    """
    num_examples = x.shape[0]
    sampling_rate = poisson_sampling_rate(num_examples=num_examples, batch_size=batch_size)
    noise = settings.noise_source(rng)
    batches = PoissonBatches(
        num_examples=num_examples, sampling_rate=sampling_rate, num_batches=num_steps, noise=noise
    )
    weights = start.copy()
    gradient = np.empty_like(weights)
    no_examples = np.zeros((0, weights.size), dtype=weights.dtype)
    total_loss, loss_steps = 0.0, 0
    # A diverging run overflows to inf and NaN; it is reported below, not warned about.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(num_steps):
            chosen = batches.draw()
            loss, rows = 0.0, no_examples
            if chosen.size:
                loss, rows = model.per_example_gradients(weights, x[chosen], y[chosen])
            gradient[:] = dp_sgd_gradient(
                rows,
                clip_norm=settings.clip_norm,
                noise_multiplier=settings.noise_multiplier,
                expected_batch_size=sampling_rate * num_examples,
                noise=noise,
            )
            penalty = model.add_weight_decay_(weights, gradient)
            if chosen.size:
                total_loss, loss_steps = total_loss + loss + penalty, loss_steps + 1
            if proximal_mu > 0:
                gradient += proximal_mu * (weights - start)
            gradient *= learning_rate
            weights -= gradient
    mean_loss = total_loss / loss_steps if loss_steps else 0.0
    if not (math.isfinite(mean_loss) and np.isfinite(weights).all()):
        raise ClientError(f"DP-SGD diverged (mean loss {mean_loss}): lower the learning rate")
    return weights, mean_loss


def dp_sgd_metrics(
    settings: DpSgdSettings, *, steps: int, sampling_rate: float
) -> dict[str, float]:
    """What a client reports so that the coordinator can account for its DP-SGD."""
    return {
        "dp_sgd_steps": float(steps),
        "dp_sgd_sampling_rate": sampling_rate,
        "dp_sgd_noise_multiplier": settings.noise_multiplier,
        "dp_sgd_clip_norm": settings.clip_norm,
        "dp_sgd_delta": settings.delta,
    }


def record_level_epsilon(
    *, noise_multiplier: float, sampling_rate: float, steps: int, delta: float
) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps, by ``dp-accounting``'s RDP accountant.

    This is one client's record-level epsilon for one fit; composing fits
    over rounds is the coordinator's accountant's job. Zero steps cost
    nothing; ``noise_multiplier`` 0 gives infinity. The RDP-to-(epsilon,
    delta) conversion is dp-accounting's current one, tighter than the
    classic one of published tables.
    """
    if steps < 0 or not 0 <= sampling_rate <= 1 or not 0 < delta < 1:
        raise ConfigError("need steps >= 0, a sampling rate in [0, 1] and delta in (0, 1)")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if steps == 0 or sampling_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = PrivacyAccountant()  # RDP, Poisson sampling, the improved conversion
    accountant.compose(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
    return accountant.epsilon(delta=delta)
