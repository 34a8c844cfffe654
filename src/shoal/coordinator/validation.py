"""Whether a client's result is well formed: an update's shape, dtype and values, a weight.

The engine asks these of every update and evaluation, whichever shell
delivered it (the simulator or the network service): an update is a finite
float32 vector of the model's size, trained on at least one example. They
are the protocol's floor, not a judgement: how large an update or its
claimed weight may be is the policy's (:mod:`shoal.governance.policy`,
``[policy]``), which decides on every update that clears this floor.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shoal.coordinator.rounds import RoundSettings
from shoal.core.clusters import CLUSTER_METRIC, chosen_cluster, touched_clusters
from shoal.core.parameters import Vector, all_finite


def update_problem(update: Vector, *, num_examples: int, size: int) -> str | None:
    """What is wrong with an update for a model of ``size`` values, or None if it is well formed."""
    if update.ndim != 1 or update.size != size:
        return f"update has shape {update.shape}, the model has {size} values"
    if update.dtype != np.float32:
        return f"update has dtype {update.dtype}, expected float32"
    if not all_finite(update):
        return "update holds NaN or infinite values"
    if num_examples == 0:
        return "update was trained on zero examples"
    return None


def cluster_problem(update: Vector, metrics: Mapping[str, object], *, clusters: int) -> str | None:
    """What is wrong with a clustered client's update (it names one cluster, below
    ``clusters``, and changes no other cluster's model), or None."""
    chosen = chosen_cluster(metrics, clusters=clusters)
    if chosen is None:
        return f"a clustered update names no cluster below {clusters} in {CLUSTER_METRIC!r}"
    others = [c for c in touched_clusters(update, clusters=clusters) if c != chosen]
    if others:
        return f"the update chose cluster {chosen} but changes cluster {others[0]}'s model"
    return None


def count_problem(num_examples: int, *, settings: RoundSettings) -> str | None:
    """Why a client's evaluation cannot weigh in a round, or None if it can."""
    bound = settings.max_examples_per_client
    if num_examples > bound:
        return f"num_examples {num_examples} is over the bound of {bound} (policy.max_examples)"
    return None
