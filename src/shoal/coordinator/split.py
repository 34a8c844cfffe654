"""When one model splits into cluster models: clustered FL that starts when the drift flags.

Under ``[clustering] start = "flagged"`` a run trains one model until a
plaintext fit round's drift flags distinct populations
(:attr:`~shoal.aggregation.drift.DriftReport.bimodal`). At that round's
commit the model becomes a stack of cluster models (:mod:`shoal.core.clusters`):
one per group of the drift's k-means labels, at most
:attr:`SplitRule.max_clusters` (:func:`~shoal.aggregation.clustered.merged_groups`),
each the round's model moved by its own group's mean update
(:func:`~shoal.aggregation.clustered.group_models`); from the next round on
the engine aggregates per cluster. The strategy a model takes follows from
its layout (:meth:`SplitRule.strategy_for`), so that a resume, or a
rollback to a version before the split, finds the right one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.aggregation.clustered import group_models, merged_groups
from shoal.aggregation.drift import DriftReport
from shoal.aggregation.strategy import Strategy, clustered_strategy
from shoal.coordinator.events import ClusterSplit
from shoal.coordinator.round_summary import Counted
from shoal.core.clusters import split_models, stack_models, stacked_clusters
from shoal.core.errors import StrategyError
from shoal.core.parameters import Layout, Parameters, Vector


@dataclass(frozen=True, slots=True)
class Split:
    """The stack a round's model split into, and what the round's row and audit log say."""

    parameters: Parameters
    report: ClusterSplit


@dataclass(frozen=True, slots=True)
class SplitRule:
    """A run of one model splits, at a round whose drift flags groups, into at most
    ``max_clusters`` cluster models."""

    max_clusters: int

    def __post_init__(self) -> None:
        if self.max_clusters < 2:
            raise StrategyError(f"a split needs at least 2 clusters, got {self.max_clusters}")

    def strategy_for(self, base: Strategy, parameters: Parameters) -> Strategy:
        """``base`` for one model; ``base`` per cluster for a stack, over as many as it holds."""
        clusters = stacked_clusters(parameters)
        return base if clusters is None else clustered_strategy(base, clusters=clusters)

    def split(
        self,
        model: Parameters,
        aggregate: Vector,
        *,
        round_number: int,
        drift: DriftReport | None,
        counted: Counted | None,
        weights: Sequence[float],
    ) -> Split | None:
        """The stack ``model`` (the round's new model, stepped by ``aggregate``) splits into,
        or None: the drift flagged no groups, or they merge into fewer than two.

        ``counted``: the round's counted clients and updates, in the drift's order;
        ``weights``: each update's weight in the round's aggregate.
        """
        if drift is None or not drift.bimodal or counted is None:
            return None
        _, updates = counted
        if len(drift.labels) != len(updates) or len(weights) != len(updates):
            return None  # not the rounds' own measure: nothing to split by
        groups = merged_groups(drift.labels, updates, clusters=self.max_clusters)
        clusters = len(set(groups))
        if clusters < 2:
            return None
        models = group_models(model.vector, aggregate, updates, groups=groups, weights=weights)
        stacked = stack_models([model.with_vector(row) for row in models])
        sizes = tuple(int(size) for size in np.bincount(np.asarray(groups), minlength=clusters))
        return Split(stacked, ClusterSplit(round_number, clusters, sizes))


def single_layout(parameters: Parameters) -> Layout:
    """The layout of one model of ``parameters`` (itself, or one cluster model of a stack)."""
    clusters = stacked_clusters(parameters)
    if clusters is None:
        return parameters.layout
    return split_models(parameters, clusters=clusters)[0].layout
