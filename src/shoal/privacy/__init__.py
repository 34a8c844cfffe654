"""Differential privacy: mechanisms on updates, their noise, and the budget a run spends.

The budget keeper (``shoal.privacy.budget``) and a run's privacy
(``shoal.privacy.run``) are imported from their own paths: they build on
the registry and the config.
"""

from shoal.privacy.accounting import (
    DEFAULT_PLD_DISCRETIZATION,
    AccountingScheme,
    CompositionRecord,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    default_delta,
    epsilon_from_rdp,
)
from shoal.privacy.client import privatize_update
from shoal.privacy.coordinator import DpCoordinator, DpSettings, check_private_strategy
from shoal.privacy.exposure import (
    EXPOSURE_CEILING,
    canary_rank,
    exposure,
    exposures,
    extrapolated_exposures,
    record_losses,
)
from shoal.privacy.mechanisms import (
    PLACEMENTS,
    ClipResult,
    ClipState,
    NoiseSplit,
    adapted_clip_norm,
    clip_by_l2_norm,
    clip_transform,
    noise_transform,
    noised_mean,
    split_noise,
)
from shoal.privacy.noise import InsecureNoiseWarning, NoiseSource

__all__ = [
    "DEFAULT_PLD_DISCRETIZATION",
    "EXPOSURE_CEILING",
    "PLACEMENTS",
    "AccountingScheme",
    "ClipResult",
    "ClipState",
    "CompositionRecord",
    "DpCoordinator",
    "DpSettings",
    "InsecureNoiseWarning",
    "NoiseSource",
    "NoiseSplit",
    "PrivacyAccountant",
    "adapted_clip_norm",
    "calibrate_noise_multiplier",
    "canary_rank",
    "check_private_strategy",
    "clip_by_l2_norm",
    "clip_transform",
    "default_delta",
    "epsilon_from_rdp",
    "exposure",
    "exposures",
    "extrapolated_exposures",
    "noise_transform",
    "noised_mean",
    "privatize_update",
    "record_losses",
    "split_noise",
]
