"""Clustered aggregation: any rule applied per cluster, over the clients that chose that cluster.

The model is k cluster models stacked (:mod:`shoal.core.clusters`); a
client's update changes the block of the cluster it trained and leaves the
others zero. :class:`PerCluster` keeps one state of its inner rule per
block and gives each block only the updates that touched it: cluster ``c``'s
model moves by the mean (or median...) of its own clients' updates, and a
cluster no client chose stays where it is.

>>> rule = PerCluster(WeightedMean(), clusters=2)
>>> state = rule.init(num_parameters=4)
>>> state = rule.accumulate(state, np.array([1, 1, 0, 0], np.float32), weight=1.0)
>>> state = rule.accumulate(state, np.array([3, 3, 0, 0], np.float32), weight=1.0)
>>> state = rule.accumulate(state, np.array([0, 0, 5, 5], np.float32), weight=2.0)
>>> rule.finalize(state)
array([2., 2., 5., 5.], dtype=float32)

A run that starts with one model (``[clustering] start = "flagged"``) splits
it when a round's drift flags distinct groups: :func:`merged_groups` makes the
drift's k-means labels at most k groups, and :func:`group_models` gives each
group the model its own clients' mean update would have made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shoal.aggregation.aggregators import Aggregator, AggregatorState, check_shape
from shoal.core.clusters import touched_clusters
from shoal.core.errors import StrategyError
from shoal.core.parameters import Vector


@dataclass(frozen=True, slots=True)
class ClusterStates:
    """The inner rule's state for each cluster's block, and whether an update touched it."""

    blocks: tuple[AggregatorState, ...]
    touched: tuple[bool, ...]
    size: int  # values per cluster model


@dataclass(frozen=True, slots=True)
class PerCluster:
    """``inner`` over each cluster's block, fed the updates that touched the block."""

    inner: Aggregator
    clusters: int

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise StrategyError(f"clusters must be at least 1, got {self.clusters}")

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def streaming(self) -> bool:
        return self.inner.streaming

    def init(self, *, num_parameters: int) -> ClusterStates:
        if num_parameters % self.clusters:
            raise StrategyError(
                f"a model of {num_parameters} values does not split into {self.clusters} clusters"
            )
        size = num_parameters // self.clusters
        blocks = tuple(self.inner.init(num_parameters=size) for _ in range(self.clusters))
        return ClusterStates(blocks, (False,) * self.clusters, size)

    def accumulate(self, state: ClusterStates, update: Vector, *, weight: float) -> ClusterStates:
        check_shape(update, num_parameters=state.size * self.clusters)
        blocks, touched = list(state.blocks), list(state.touched)
        for cluster in touched_clusters(update, clusters=self.clusters):
            block = update[cluster * state.size : (cluster + 1) * state.size]
            blocks[cluster] = self.inner.accumulate(blocks[cluster], block, weight=weight)
            touched[cluster] = True
        return ClusterStates(tuple(blocks), tuple(touched), state.size)

    def finalize(self, state: ClusterStates) -> Vector:
        """Each touched cluster's aggregate, a zero step for the others."""
        if not any(state.touched):
            raise StrategyError("cannot aggregate: no update touched any cluster")
        parts = [
            self.inner.finalize(block) if touched else np.zeros(state.size, np.float32)
            for block, touched in zip(state.blocks, state.touched, strict=True)
        ]
        return np.concatenate(parts).astype(np.float32, copy=False)


def merged_groups(
    labels: Sequence[int], updates: npt.NDArray[np.floating], *, clusters: int
) -> tuple[int, ...]:
    """Each update's group: its ``labels`` (the drift's k-means clusters) with at most
    ``clusters`` groups, numbered from 0 by size (largest first; ties by label).

    While there are too many, the smallest group (ties: the higher label) joins the group
    whose mean direction is nearest its own (each update scaled to unit length, as the drift
    clusters them), so that a small third population joins the one it resembles.

    >>> updates = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [0.9, 0.2]], np.float32)
    >>> merged_groups([0, 0, 1, 1, 2], updates, clusters=2)
    (0, 0, 1, 1, 0)
    """
    if clusters < 1:
        raise StrategyError(f"clusters must be at least 1, got {clusters}")
    if len(labels) != len(updates):
        raise StrategyError("merging groups needs one label per update")
    groups = np.asarray(labels, np.int64)
    if groups.size == 0:
        return ()
    norms = np.linalg.norm(updates.astype(np.float64), axis=1, keepdims=True)
    directions = updates.astype(np.float64) / np.where(norms > 0, norms, 1.0)
    while len(present := np.unique(groups)) > clusters:
        sizes = np.array([np.sum(groups == label) for label in present])
        smallest = present[max(range(len(present)), key=lambda i: (-sizes[i], present[i]))]
        centers = {label: directions[groups == label].mean(axis=0) for label in present}
        others = [label for label in present if label != smallest]
        nearest = min(others, key=lambda label: np.sum((centers[label] - centers[smallest]) ** 2))
        groups[groups == smallest] = nearest
    present, sizes = np.unique(groups, return_counts=True)
    order = sorted(range(len(present)), key=lambda i: (-sizes[i], present[i]))
    renumber = {int(present[i]): number for number, i in enumerate(order)}
    return tuple(renumber[int(label)] for label in groups)


def group_models(
    model: Vector,
    aggregate: Vector,
    updates: npt.NDArray[np.floating],
    *,
    groups: Sequence[int],
    weights: Sequence[float],
) -> npt.NDArray[np.float32]:
    """One model per group (a row each): ``model``, the round's new model, moved by the group's
    weighted mean update less the round's ``aggregate`` (the mean the model was stepped by).

    Under FedAvg (the server's step is the aggregate) a group's model is the round's starting
    model stepped by its own group's mean: the round as that group alone would have played
    it. Groups are numbered 0 to k - 1, each with at least one update of positive weight.

    >>> updates = np.array([[2, 0], [0, 4]], np.float32)
    >>> group_models(np.array([1, 2], np.float32), np.array([1, 2], np.float32), updates,
    ...              groups=[0, 1], weights=[1, 1])
    array([[2., 0.],
           [0., 4.]], dtype=float32)
    """
    if updates.ndim != 2 or len(groups) != len(updates) or len(weights) != len(updates):
        raise StrategyError("group models need one group and one weight per update row")
    check_shape(model, num_parameters=updates.shape[1])
    check_shape(aggregate, num_parameters=updates.shape[1])
    labels = np.asarray(groups, np.int64)
    mass = np.asarray(weights, np.float64)
    count = int(labels.max()) + 1 if labels.size else 0
    if count == 0 or labels.min() < 0 or np.any(mass <= 0) or not np.all(np.isfinite(mass)):
        raise StrategyError("group models need groups numbered from 0 and positive weights")
    base = model.astype(np.float64) - aggregate.astype(np.float64)
    models = np.empty((count, updates.shape[1]), np.float32)
    for group in range(count):
        mine = labels == group
        if not np.any(mine):
            raise StrategyError(f"group {group} holds no update")
        mean = mass[mine] @ updates[mine].astype(np.float64) / mass[mine].sum()
        models[group] = base + mean
    return models
