"""DP mechanisms on updates: clipping, adaptive clipping, and Gaussian noise, as transforms.

User-level DP bounds what one client can change: its update is clipped to
L2 norm C, every client weighs the same, and Gaussian noise with standard
deviation z * C is added to the sum (DP-FedAvg, McMahan et al. 2018). Where
the noise is added is the placement:

- central: the coordinator adds it to the sum (it sees clipped updates, or
  the secure sum of them);
- local: each client adds it before its update leaves the device;
- distributed: each client adds a share of discrete Gaussian noise in the
  quantized domain of secure aggregation, so that the sum carries the whole
  noise and the coordinator never sees a less noised value.

Adaptive clipping (Andrew et al. 2021) moves C geometrically towards the
target quantile of the update norms, from a noised count of the clients
whose update was not clipped; the noise multiplier is split between the
update and that count as in the paper.

The pure functions hold the math; :func:`clip_transform` and
:func:`noise_transform` wrap it as update transforms for a ``chain``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ConfigError
from shoal.core.transforms import Transform, TransformResult, TransformState, Vector
from shoal.privacy.noise import NoiseSource

Placement = Literal["central", "local", "distributed"]
PLACEMENTS: tuple[Placement, ...] = ("central", "local", "distributed")


@dataclass(frozen=True, slots=True)
class ClipResult:
    """A clipped update and whether it was left as it was (its norm was within the bound)."""

    update: Vector
    unclipped: bool
    norm: float


def clip_by_l2_norm(update: Vector, *, clip_norm: float) -> ClipResult:
    """Scale ``update`` down to L2 norm ``clip_norm`` if it is longer; a zero vector stays."""
    if not clip_norm > 0:
        raise ConfigError(f"clip_norm must be positive, got {clip_norm}")
    norm = float(np.sqrt(np.dot(update.astype(np.float64), update.astype(np.float64))))
    if norm <= clip_norm:
        return ClipResult(update, True, norm)
    return ClipResult((update * (clip_norm / norm)).astype(np.float32), False, norm)


def clip_transform(*, clip_norm: float) -> Transform:
    """The stateless transform that clips an update to ``clip_norm``."""

    def init(params: Vector) -> TransformState:
        del params
        return ()

    def update(
        updates: Vector, state: TransformState, params: Vector | None = None
    ) -> TransformResult:
        del params
        return TransformResult(clip_by_l2_norm(updates, clip_norm=clip_norm).update, state)

    return Transform(init, update)


def noise_transform(*, std: float, noise: NoiseSource) -> Transform:
    """The transform that adds N(0, std^2) to every value; the source is its explicit state."""

    def init(params: Vector) -> TransformState:
        del params
        return ()

    def update(
        updates: Vector, state: TransformState, params: Vector | None = None
    ) -> TransformResult:
        del params
        noised = updates + noise.normal(updates.size, std=std).astype(np.float32)
        return TransformResult(noised.astype(np.float32), state)

    return Transform(init, update)


@dataclass(frozen=True, slots=True)
class NoiseSplit:
    """How a total noise multiplier is shared between the update sum and the unclipped count."""

    update_multiplier: float
    count_std: float  # the standard deviation of the noise on the count of unclipped clients


def split_noise(*, noise_multiplier: float, count_std: float) -> NoiseSplit:
    """Andrew et al. 2021: z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2), so the pair costs z.

    Without adaptive clipping (``count_std`` 0) the update keeps the whole multiplier.
    """
    if noise_multiplier < 0:
        raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if count_std <= 0 or noise_multiplier == 0:
        return NoiseSplit(noise_multiplier, 0.0)
    # compared before the powers: a tiny count_std's (2 sigma_b)^-2 would leave float range
    remaining = (
        0.0 if 2 * count_std <= noise_multiplier else (noise_multiplier**-2 - (2 * count_std) ** -2)
    )
    if remaining <= 0:
        raise ConfigError(
            f"a clipped-count noise of std {count_std} would take the whole noise multiplier "
            f"{noise_multiplier} (it must exceed half of it): raise privacy.clipped_count_std"
        )
    return NoiseSplit(remaining**-0.5, count_std)


def adapted_clip_norm(
    clip_norm: float,
    *,
    unclipped_fraction: float,
    target_quantile: float,
    learning_rate: float,
) -> float:
    """The geometric update C * exp(-eta (b - gamma)) of Andrew et al. 2021."""
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


@dataclass(frozen=True, slots=True)
class ClipState:
    """The clip norm in force for the next round, and how it moves."""

    clip_norm: float
    adaptive: bool = False
    target_quantile: float = 0.5
    learning_rate: float = 0.2

    def after_round(self, *, unclipped: float, count_noise: float, denominator: float) -> ClipState:
        """The next round's clip norm, from the round's (noised) count of unclipped clients."""
        if not self.adaptive or denominator <= 0:
            return self
        fraction = (unclipped + count_noise) / denominator
        norm = adapted_clip_norm(
            self.clip_norm,
            unclipped_fraction=fraction,
            target_quantile=self.target_quantile,
            learning_rate=self.learning_rate,
        )
        return ClipState(norm, True, self.target_quantile, self.learning_rate)


def noised_mean(
    total: npt.NDArray[np.floating],
    *,
    std: float,
    denominator: float,
    noise: NoiseSource,
) -> Vector:
    """(sum + N(0, std^2)) / denominator: DP-FedAvg's fixed-denominator estimate."""
    if denominator <= 0:
        raise ConfigError(f"the mean's denominator must be positive, got {denominator}")
    noised = total.astype(np.float64) + noise.normal(total.size, std=std)
    return (noised / denominator).astype(np.float32)
