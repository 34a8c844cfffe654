"""The coordinator's side of user-level DP: the clip norm, the noise, the fixed denominator.

One :class:`DpCoordinator` lives in the round engine. It tells each fit task
the clip norm (and, for local and distributed DP, each client's share of the
noise), re-clips what arrives in plaintext, and turns the round's sum of
clipped updates into the noised mean of DP-FedAvg:

    delta = (sum of clipped updates + N(0, (z C)^2)) / denominator

where the Gaussian is added here only for central DP; under local or
distributed DP it is already in the sum. The denominator is fixed before
the round: ``clients_per_round`` for a fixed-size cohort, the expected
cohort size q * population for a Poisson one (never the count that
arrived). With adaptive clipping, the round's noised count of unclipped
updates moves C for the next round.

Where the clients' noise comes from is theirs to decide, never the task's:
a deployed client always draws it from the CSPRNG (see
:mod:`shoal.privacy.client`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.aggregation.aggregators import WeightedMean
from shoal.aggregation.strategy import Strategy
from shoal.core.errors import ConfigError, RunError
from shoal.core.transforms import Vector
from shoal.privacy.mechanisms import (
    PLACEMENTS,
    ClipState,
    Placement,
    clip_by_l2_norm,
    noised_mean,
    split_noise,
)
from shoal.privacy.noise import NoiseSource

# the prefix of the metrics a client may report under user-level DP (its DP bookkeeping)
DP_METRIC_PREFIX = "dp_"
# the keys a fit task's extras carry to the client
CLIP_NORM = "dp_clip_norm"
LOCAL_NOISE_STD = "dp_local_noise_std"
DISTRIBUTED_NOISE_STD = "dp_distributed_noise_std"
UNCLIPPED = "dp_unclipped"  # what a client reports back: 1.0 if its update was within the norm
DP_TASK_KEYS = frozenset({CLIP_NORM, LOCAL_NOISE_STD, DISTRIBUTED_NOISE_STD})
"""What a fit task's DP is made of: the coordinator's alone, never a server app's round config."""


@dataclass(frozen=True, slots=True)
class DpSettings:
    """User-level DP for a run: placement, noise multiplier, clipping."""

    placement: Placement
    noise_multiplier: float
    clip_norm: float
    clients_per_round: int  # DP-FedAvg's fixed denominator
    min_clients: int  # the fewest whose noise shares must add up to the target (distributed)
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_std: float | None = None  # unset: clients_per_round / 20 (the paper), >= z

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"privacy.placement must be one of {PLACEMENTS}, got {self.placement}"
            )
        if not self.noise_multiplier >= 0 or not math.isfinite(self.noise_multiplier):
            raise ConfigError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.clip_norm > 0:
            raise ConfigError(f"privacy.clip_norm must be positive, got {self.clip_norm}")
        if self.clients_per_round < 1 or not 1 <= self.min_clients <= self.clients_per_round:
            raise ConfigError("DP needs 1 <= min_clients <= clients_per_round")

    @property
    def count_std(self) -> float:
        if not self.adaptive_clipping:
            return 0.0
        if self.clipped_count_std is not None:
            return self.clipped_count_std
        # the paper's m / 20, but never so small that it takes most of the noise (small cohorts)
        return max(self.clients_per_round / 20, self.noise_multiplier)


def check_private_strategy(strategy: Strategy) -> None:
    """DP-FedAvg's noise is calibrated for the mean of clipped updates: refuse other rules."""
    if not isinstance(strategy.aggregator, WeightedMean):
        raise ConfigError(
            f"differential privacy calibrates its noise for the mean of clipped updates, but the "
            f"{strategy.name!r} strategy aggregates with {type(strategy.aggregator).__name__}; "
            "use a mean-based strategy (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad)"
        )


class DpCoordinator:
    """The engine's DP state across rounds; see the module docstring."""

    def __init__(self, settings: DpSettings, noise: NoiseSource) -> None:
        self.settings = settings
        self.noise = noise
        self.split = split_noise(
            noise_multiplier=settings.noise_multiplier, count_std=settings.count_std
        )
        self.clip = ClipState(
            settings.clip_norm,
            adaptive=settings.adaptive_clipping,
            target_quantile=settings.target_quantile,
            learning_rate=settings.clip_learning_rate,
        )

    @property
    def update_std(self) -> float:
        """The standard deviation of the noise on the sum of updates: z_update * C."""
        return self.split.update_multiplier * self.clip.clip_norm

    def use_noise_multiplier(self, noise_multiplier: float) -> None:
        """Take the run's planned noise multiplier (it is calibrated at the first round)."""
        self.settings = replace(self.settings, noise_multiplier=noise_multiplier)
        self.split = split_noise(
            noise_multiplier=noise_multiplier, count_std=self.settings.count_std
        )

    def resume_clip_norm(self, clip_norm: float) -> None:
        """Continue adaptive clipping from the norm a committed round left (a restart)."""
        if not clip_norm > 0 or not math.isfinite(clip_norm):
            raise RunError(f"the saved clip norm must be finite and positive, got {clip_norm}")
        self.clip = replace(self.clip, clip_norm=clip_norm)

    def fit_extras(self) -> dict[str, Any]:
        """What each fit task tells its client: the clip norm, and its share of the noise."""
        extras: dict[str, Any] = {CLIP_NORM: self.clip.clip_norm}
        if self.settings.placement == "local":
            extras[LOCAL_NOISE_STD] = self.update_std
        elif self.settings.placement == "distributed":
            # each share is sized so that the fewest survivors still add up to the target
            extras[DISTRIBUTED_NOISE_STD] = self.update_std / math.sqrt(self.settings.min_clients)
        return extras

    def admit(self, update: Vector, *, reported: float | None = None) -> tuple[Vector, bool]:
        """A plaintext update as it may count, and whether it was within C.

        The client clipped it already and ``reported`` whether it had to; the
        coordinator clips again (central DP), so that a client that did not
        clip cannot raise the sensitivity.
        """
        if self.settings.placement == "local":
            return update, True  # noised on the device: clipping it now would only bias it
        clipped = clip_by_l2_norm(update, clip_norm=self.clip.clip_norm)
        within = clipped.unclipped if reported is None else clipped.unclipped and reported >= 0.5
        return clipped.update, within

    def private_mean(
        self,
        total: npt.NDArray[np.floating],
        *,
        unclipped: float,
        denominator: float | None = None,
    ) -> Vector:
        """The round's DP estimate of the mean update, and the clip norm for the next round.

        ``denominator``: the round's expected cohort size under Poisson
        sampling; unset, DP-FedAvg's fixed ``clients_per_round``.
        """
        if denominator is None:
            denominator = float(self.settings.clients_per_round)
        std = self.update_std if self.settings.placement == "central" else 0.0
        mean = noised_mean(total, std=std, denominator=denominator, noise=self.noise)
        count_noise = float(self.noise.normal(1, std=self.split.count_std)[0])
        self.clip = self.clip.after_round(
            unclipped=unclipped, count_noise=count_noise, denominator=denominator
        )
        return mean
