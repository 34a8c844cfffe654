"""A round's two measures of its updates at once: divergence and drift, from one copy of them.

Both read every counted update of a plaintext fit round. Where the updates are few enough
to send (:func:`~shoal.aggregation.drift.sent_together`), a simulation sends them
once to a worker that the round leaves idle, which makes both reports while the coordinator
commits the round (:func:`measures_later`); each is what its own function gives here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from shoal.aggregation.divergence import (
    DivergenceReport,
    DivergenceRule,
    FloatMatrix,
    measure_divergence,
)
from shoal.aggregation.drift import DriftReport, DriftRule, measure_drift
from shoal.core.later import Later, Offload, Part, Ready

Measures = tuple[DivergenceReport, DriftReport]


def measure_both(
    client_ids: Sequence[str],
    updates: FloatMatrix,
    aggregate: npt.NDArray[np.floating],
    divergence: DivergenceRule,
    drift: DriftRule,
    seed: int,
) -> Measures:
    """:func:`~shoal.aggregation.divergence.measure_divergence` and
    :func:`~shoal.aggregation.drift.measure_drift` of the same updates."""
    return (
        measure_divergence(client_ids, updates, aggregate, rule=divergence, seed=seed),
        measure_drift(client_ids, updates, rule=drift, seed=seed),
    )


def measures_later(
    client_ids: Sequence[str],
    updates: FloatMatrix,
    aggregate: npt.NDArray[np.floating],
    *,
    divergence: DivergenceRule,
    drift: DriftRule,
    seed: int,
    offload: Offload,
) -> tuple[Later[DivergenceReport], Later[DriftReport]]:
    """:func:`measure_both` as ``offload``'s work (call it where
    :func:`~shoal.aggregation.drift.sent_together`)."""
    both = offload(measure_both, tuple(client_ids), updates, aggregate, divergence, drift, seed)
    if isinstance(both, Ready):  # done here: each report as it is
        return Ready(both.value[0]), Ready(both.value[1])
    return Part(both, 0), Part(both, 1)
