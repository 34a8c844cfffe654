"""A clustered model: k models of one layout stacked in one parameter vector, each under a prefix.

Clustered FL (IFCA, :mod:`shoal.client.clustered`) keeps one model per
cluster. The global model is their stack: cluster ``c``'s tensor ``w`` is
named ``cluster<c>/w``, so versioning, signing, resume and every vector
operation see one ordinary :class:`~shoal.core.parameters.Parameters`.
A client's update changes only the cluster model it trained (the other
blocks are zero) and names that cluster in its metrics (:data:`CLUSTER_METRIC`).

>>> model = Parameters.from_arrays([np.ones(2)], names=["w"])
>>> stacked = stack_models([model, model])
>>> stacked.layout.names, len(split_models(stacked, clusters=2))
(('cluster0/w', 'cluster1/w'), 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from shoal.core.errors import ModelError
from shoal.core.parameters import Layout, Parameters, Vector

CLUSTER_METRIC = "cluster"
"""The metric in which a clustered client reports the cluster it chose (its index)."""


def cluster_prefix(cluster: int) -> str:
    return f"cluster{cluster}/"


def stack_models(models: Sequence[Parameters]) -> Parameters:
    """One parameter vector holding ``models`` (of one layout) in order, each under its prefix."""
    if not models:
        raise ModelError("a clustered model needs at least one cluster")
    layout = models[0].layout
    if any(model.layout != layout for model in models[1:]):
        raise ModelError("the cluster models must share one layout")
    specs = tuple(
        replace(spec, name=cluster_prefix(cluster) + spec.name)
        for cluster in range(len(models))
        for spec in layout.specs
    )
    return Parameters(np.concatenate([model.vector for model in models]), Layout(specs))


def split_models(parameters: Parameters, *, clusters: int) -> list[Parameters]:
    """The ``clusters`` models a stacked vector holds (zero-copy views), in their own layout."""
    specs = parameters.layout.specs
    if clusters < 1 or len(specs) % clusters:
        raise ModelError(f"a model of {len(specs)} tensors does not hold {clusters} clusters")
    each = len(specs) // clusters
    first = specs[:each]
    prefix = cluster_prefix(0)
    if not all(spec.name.startswith(prefix) for spec in first):
        raise ModelError(
            f"the model is not a stack of {clusters} cluster models (its tensors lack the "
            f"{prefix!r} prefix): was it trained with the same [clustering] clusters?"
        )
    layout = Layout(tuple(replace(s, name=s.name[len(prefix) :]) for s in first))
    for cluster in range(clusters):
        mine = specs[cluster * each : (cluster + 1) * each]
        if tuple(s.name for s in mine) != tuple(cluster_prefix(cluster) + n for n in layout.names):
            raise ModelError(f"cluster {cluster}'s tensors are not where the layout puts them")
    blocks = parameters.vector.reshape(clusters, layout.size)
    return [Parameters(block, layout) for block in blocks]


def stacked_clusters(parameters: Parameters) -> int | None:
    """How many cluster models ``parameters`` stacks (None: it is one model, unstacked).

    Read from the layout (cluster 0's tensors, then each next cluster's), so that a clustered
    client serves a run before and after it splits (``[clustering] start = "flagged"``).

    >>> model = Parameters.from_arrays([np.ones(2)], names=["w"])
    >>> stacked_clusters(model), stacked_clusters(stack_models([model] * 3))
    (None, 3)
    """
    names = parameters.layout.names
    prefix = cluster_prefix(0)
    if not names or not names[0].startswith(prefix):
        return None
    each = sum(1 for name in names if name.startswith(prefix))
    clusters = len(names) // each
    split_models(parameters, clusters=clusters)  # refuses a stack out of order
    return clusters


def perturbed_stack(model: Parameters, *, clusters: int, seed: int, scale: float) -> Parameters:
    """``clusters`` copies of ``model``, each but the first moved by seeded Gaussian noise of
    ``scale`` times the model's RMS value (or ``scale`` itself for a zero model), so that the
    clusters differ from the start (identical models would tie on every client's loss)."""
    rms = float(np.sqrt(np.mean(np.square(model.vector, dtype=np.float64)))) if len(model) else 0
    spread = scale * (rms if rms > 0 else 1.0)
    rng = np.random.default_rng([seed, 0xC7])
    copies = [model] + [
        model.with_vector(
            (model.vector + spread * rng.standard_normal(len(model))).astype(np.float32)
        )
        for _ in range(clusters - 1)
    ]
    return stack_models(copies)


def chosen_cluster(metrics: Mapping[str, object], *, clusters: int) -> int | None:
    """The cluster a result's metrics name (None: none, or not an index below ``clusters``)."""
    value = metrics.get(CLUSTER_METRIC)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value != int(value) or not 0 <= value < clusters:
        return None
    return int(value)


def touched_clusters(update: Vector, *, clusters: int) -> list[int]:
    """The clusters whose block of ``update`` holds a non-zero value."""
    blocks = update.reshape(clusters, -1)
    return [int(c) for c in np.flatnonzero(np.any(blocks != 0, axis=1))]
