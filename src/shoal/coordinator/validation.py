"""Whether a client's result may count in a round: an update's shape, dtype, values and weight.

The engine asks these of every update and evaluation, whichever shell
delivered it (the simulator or the network service), so they are the floor
that every submission clears: values finite and at most
``RoundSettings.max_update_abs`` in magnitude, and no more than
``RoundSettings.max_examples_per_client`` examples claimed as a weight. One
update of 1e30 values would ruin the model for good, and one weighted by
``2**63 - 1`` examples would outweigh every honest client; the norm policy
of governance bounds updates more tightly on top of this.
"""

from __future__ import annotations

import numpy as np

from shoal.coordinator.rounds import RoundSettings
from shoal.core.parameters import Vector, all_finite, all_within


def update_problem(
    update: Vector, *, num_examples: int, size: int, settings: RoundSettings
) -> str | None:
    """What is wrong with an update for a model of ``size`` values, or None if it may count."""
    if update.ndim != 1 or update.size != size:
        return f"update has shape {update.shape}, the model has {size} values"
    if update.dtype != np.float32:
        return f"update has dtype {update.dtype}, expected float32"
    bound = settings.max_update_abs
    if not all_within(update, bound=bound):
        if not all_finite(update):
            return "update holds NaN or infinite values"
        peak = float(np.abs(update).max())
        return (
            f"update holds a value of magnitude {peak:.3g}, "
            f"over the bound of {bound:g} (round.max_update_abs)"
        )
    if num_examples == 0:
        return "update was trained on zero examples"
    return count_problem(num_examples, settings=settings)


def count_problem(num_examples: int, *, settings: RoundSettings) -> str | None:
    """Why a client's example count cannot weigh in a round, or None if it can."""
    bound = settings.max_examples_per_client
    if num_examples > bound:
        return (
            f"num_examples {num_examples} is over the bound of {bound} "
            "(round.max_examples_per_client)"
        )
    return None
