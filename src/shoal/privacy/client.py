"""The client's side of user-level DP: clip the update, and under local DP noise it, before upload.

The fit task's extras say what to do (see :mod:`shoal.privacy.coordinator`
for the keys): without a clip norm the update leaves as it is. Under
distributed DP the client's noise is added later, in the quantized domain of
secure aggregation (:class:`shoal.secure.client.Contribution`).

Where the noise comes from is the client's own decision, never the task's:
a coordinator that could ask for seeded noise would know the seed (it sends
it) and could subtract the noise again. :func:`client_noise` draws from the
CSPRNG; only the in-process simulator, which plays the coordinator and the
clients alike, passes a seed (``privacy.secure_noise = false``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.config import Config
from shoal.core.errors import ClientError
from shoal.core.transforms import Vector
from shoal.privacy.coordinator import (
    CLIP_NORM,
    DISTRIBUTED_NOISE_STD,
    DP_METRIC_PREFIX,
    LOCAL_NOISE_STD,
    UNCLIPPED,
)
from shoal.privacy.mechanisms import clip_by_l2_norm
from shoal.privacy.noise import NoiseSource


@dataclass(frozen=True, slots=True)
class PrivacyFloor:
    """What a deployed client requires of every fit task when its own job runs under DP.

    The coordinator sends the clip norm and the noise each task adds; one
    that sent no clip norm, or a noise of 0, would receive raw updates. The
    client checks the task against its own copy of the job: a clip norm must
    come, and under ``local`` or ``distributed`` placement the noise must be
    at least ``min_noise_multiplier`` times the clip norm, that of the whole
    cohort (``clients_per_round`` shares) under distributed DP. Under
    ``central`` placement the coordinator adds the noise: it is trusted with it.

    >>> floor = PrivacyFloor("local", min_noise_multiplier=0.5, clients_per_round=10)
    >>> floor.check({CLIP_NORM: 1.0, LOCAL_NOISE_STD: 0.0})
    Traceback (most recent call last):
    shoal.core.errors.ClientError: ...
    """

    placement: str
    min_noise_multiplier: float
    clients_per_round: int

    @classmethod
    def of(cls, config: Config) -> PrivacyFloor | None:
        """The floor of ``config``'s ``[privacy]`` (None when the job runs without DP)."""
        section = config.privacy
        if not section.enabled:
            return None
        return cls(
            section.placement,
            min_noise_multiplier=section.client_min_noise_multiplier,
            clients_per_round=config.round.clients_per_round,
        )

    def check(self, extras: Mapping[str, Any]) -> None:
        """Refuse (:class:`ClientError`) a task that would release too little noise."""
        clip_norm = _positive(extras.get(CLIP_NORM))
        if clip_norm is None:
            raise ClientError(
                "the job runs under differential privacy, but the task asks for no clipping: "
                "refused, the update would leave as it is"
            )
        if self.placement == "local":
            std = _positive(extras.get(LOCAL_NOISE_STD)) or 0.0
        elif self.placement == "distributed":
            share = _positive(extras.get(DISTRIBUTED_NOISE_STD)) or 0.0
            std = share * math.sqrt(self.clients_per_round)
        else:
            return
        if std < self.min_noise_multiplier * clip_norm:
            raise ClientError(
                f"the task's {self.placement} DP noise is {std / clip_norm:.3g} times the clip "
                f"norm, below this client's floor of {self.min_noise_multiplier:g} "
                "(privacy.client_min_noise_multiplier): refused"
            )


def _positive(value: Any) -> float | None:
    """A finite positive number from a task's extras, else None (absent or nonsense)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number > 0 else None


def client_noise(*, seed: int | None = None) -> NoiseSource:
    """A client's DP noise: the CSPRNG; seeded only by the simulator, which owns both sides.

    Nothing in a task chooses between them: a deployed client never passes a seed.
    """
    if seed is None:
        return NoiseSource.secure()
    return NoiseSource.seeded(np.random.default_rng([seed, 0xD1FF]))


def privatize_update(
    update: Vector,
    extras: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    *,
    noise: NoiseSource | None = None,
) -> tuple[Vector, dict[str, float]]:
    """The update as it may leave the device, and the training metrics that may go with it.

    Under user-level DP only the DP bookkeeping leaves (whether the update
    was within the clip norm, a DP-SGD client's accounting parameters): the
    training loss and any other metric of the client's data would be an
    un-noised release beside the noised model, so it stays on the device.
    """
    clip_norm = extras.get(CLIP_NORM)
    if clip_norm is None:
        return update, dict(metrics or {})
    clipped = clip_by_l2_norm(update, clip_norm=float(clip_norm))
    released = {name: value for name, value in (metrics or {}).items() if _is_bookkeeping(name)}
    metrics = released | {UNCLIPPED: 1.0 if clipped.unclipped else 0.0}
    local_std = float(extras.get(LOCAL_NOISE_STD, 0.0))
    if local_std <= 0:
        return clipped.update, metrics
    source = noise if noise is not None else NoiseSource.secure()
    noised = clipped.update + source.normal(update.size, std=local_std).astype(np.float32)
    return noised.astype(np.float32), metrics


def _is_bookkeeping(name: str) -> bool:
    return name.startswith(DP_METRIC_PREFIX)


def distributed_noise_std(extras: Mapping[str, Any]) -> float:
    """This client's share of the distributed noise (0 when distributed DP is off)."""
    return float(extras.get(DISTRIBUTED_NOISE_STD, 0.0))


def uniform_weight(extras: Mapping[str, Any]) -> bool:
    """Under user-level DP every client weighs the same, whatever its example count."""
    return CLIP_NORM in extras
