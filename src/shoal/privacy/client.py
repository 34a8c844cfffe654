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

from collections.abc import Mapping
from typing import Any

import numpy as np

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
