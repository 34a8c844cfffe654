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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
