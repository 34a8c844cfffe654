"""Clustered FL's client side and aggregation: the lowest-loss cluster trains, each averages
over its own clients, the engine refuses an update that lies about its cluster."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shoal.aggregation import CoordinateMedian, PerCluster, WeightedMean, clustered_strategy
from shoal.aggregation.strategy import make_strategy
from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.client.app import ClientApp, ClientContext
from shoal.client.clustered import ClusteredClient
from shoal.config import load_config
from shoal.coordinator.validation import cluster_problem
from shoal.core import ClientError, ModelError, Parameters, StrategyError
from shoal.core.clusters import perturbed_stack, split_models, stack_models, stacked_clusters


def model(*values: float) -> Parameters:
    return Parameters.from_arrays([np.array(values, np.float32)], names=["w"])


class TargetClient(Client):
    """Its loss is the squared distance to its target; fit moves halfway there."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.evaluated: list[float] = []

    def get_parameters(self) -> Parameters:
        return model(0.0, 0.0)

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        moved = parameters.vector + 0.5 * (self.target - parameters.vector)
        return FitResult(parameters.with_vector(moved), 3, {"loss": 1.0})

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        self.evaluated.append(float(parameters.vector[0]))
        loss = float(np.sum((parameters.vector - self.target) ** 2))
        return EvaluateResult(loss, 5, {"accuracy": 1.0 / (1.0 + loss)})


def three_clusters() -> Parameters:
    return stack_models([model(0, 0), model(10, 10), model(-10, -10)])


def test_the_client_trains_the_cluster_with_the_lowest_loss_and_only_it() -> None:
    inner = TargetClient(8.0)
    client = ClusteredClient(inner, clusters=3)
    result = client.fit(three_clusters(), FitConfig(round=1))
    assert inner.evaluated == [0.0, 10.0, -10.0]  # every cluster model, on its own data
    assert result.is_update and result.metrics["cluster"] == 1 and result.num_examples == 3
    assert isinstance(result.parameters, Parameters)
    blocks = result.parameters.vector.reshape(3, 2)
    np.testing.assert_allclose(blocks, [[0, 0], [-1, -1], [0, 0]])  # halfway from 10 to 8


def test_evaluation_reports_the_best_cluster_models_result() -> None:
    result = ClusteredClient(TargetClient(-9.0), clusters=3).evaluate(
        three_clusters(), EvaluateConfig(round=1)
    )
    assert result.metrics["cluster"] == 2 and result.loss == pytest.approx(2.0)


def test_ties_and_nan_losses_go_to_the_lower_index() -> None:
    tie = stack_models([model(1, 1), model(-1, -1)])
    assert (
        ClusteredClient(TargetClient(0.0), clusters=2)
        .evaluate(tie, EvaluateConfig(round=1))
        .metrics["cluster"]
        == 0
    )

    class NanFirst(TargetClient):
        def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
            result = super().evaluate(parameters, config)
            return EvaluateResult(float("nan") if parameters.vector[0] == 0 else result.loss, 5)

    chosen = ClusteredClient(NanFirst(0.0), clusters=3).evaluate(
        three_clusters(), EvaluateConfig(round=1)
    )
    assert chosen.metrics["cluster"] == 1


def test_a_stack_of_more_clusters_than_the_job_has_is_refused() -> None:
    client = ClusteredClient(TargetClient(0.0), clusters=2)
    with pytest.raises(ModelError, match="stacks 3 cluster models, more than"):
        client.fit(three_clusters(), FitConfig(round=1))
    out_of_order = Parameters.from_arrays(
        [np.ones(2), np.ones(2), np.ones(2)], names=["cluster0/w", "cluster1/w", "cluster0/b"]
    )
    with pytest.raises(ModelError):
        client.evaluate(out_of_order, EvaluateConfig(round=1))
    with pytest.raises(ClientError):
        ClusteredClient(TargetClient(0.0), clusters=1)


def test_a_single_model_goes_to_the_wrapped_client_unchanged() -> None:
    """Before a flagged run splits, the clustered client is the app's client."""
    inner = TargetClient(8.0)
    client = ClusteredClient(inner, clusters=3)
    single = model(0, 0)
    fitted = client.fit(single, FitConfig(round=1))
    assert isinstance(fitted.parameters, Parameters) and fitted.parameters.layout == single.layout
    np.testing.assert_allclose(fitted.parameters.vector, [4, 4])  # halfway to 8
    assert fitted.metrics == {"loss": 1.0} and fitted.num_examples == 3
    assert not fitted.is_update  # the app's own answer, not rewritten as a cluster's update
    scored = client.evaluate(single, EvaluateConfig(round=1))
    assert scored.metrics == {"accuracy": pytest.approx(1 / 129)} and scored.loss == 128
    assert inner.evaluated == [0.0]  # one evaluation, of the one model


def test_the_cluster_count_is_read_from_the_stack() -> None:
    model_ = model(0, 0)
    assert stacked_clusters(model_) is None
    assert stacked_clusters(stack_models([model_])) == 1
    assert stacked_clusters(three_clusters()) == 3
    with pytest.raises(ModelError, match="not a stack"):
        stacked_clusters(
            Parameters.from_arrays([np.ones(1)] * 3, names=["cluster0/a", "cluster0/b", "x"])
        )
    # a job of up to three clusters serves a stack of two: the split found two groups
    result = ClusteredClient(TargetClient(-9.0), clusters=3).fit(
        stack_models([model(0, 0), model(-10, -10)]), FitConfig(round=1)
    )
    assert result.metrics["cluster"] == 1
    assert isinstance(result.parameters, Parameters)
    np.testing.assert_allclose(result.parameters.vector.reshape(2, 2), [[0, 0], [0.5, 0.5]])
    assert result.parameters.layout == stack_models([model_, model_]).layout


def test_the_client_app_wraps_its_clients_when_the_job_clusters() -> None:
    app = ClientApp(lambda context: TargetClient(0.0))
    plain = app(ClientContext("c1", config=load_config(None)))
    clustered = app(ClientContext("c1", config=load_config(None, ["clustering.clusters=3"])))
    assert isinstance(plain, TargetClient)
    assert isinstance(clustered, ClusteredClient) and clustered.clusters == 3


def test_each_cluster_averages_over_the_clients_that_chose_it() -> None:
    rule = PerCluster(WeightedMean(), clusters=3)
    state = rule.init(num_parameters=6)
    for update, weight in (
        ([1, 1, 0, 0, 0, 0], 1.0),
        ([3, 3, 0, 0, 0, 0], 3.0),
        ([0, 0, 0, 0, 4, -4], 2.0),
    ):
        state = rule.accumulate(state, np.array(update, np.float32), weight=weight)
    # cluster 0: weighted mean 2.5; cluster 1: nobody, no step; cluster 2: its one client
    np.testing.assert_allclose(rule.finalize(state), [2.5, 2.5, 0, 0, 4, -4])


def test_a_robust_rule_runs_per_cluster_too() -> None:
    rule = PerCluster(CoordinateMedian(), clusters=2)
    state = rule.init(num_parameters=2)
    for value in (1.0, 2.0, 100.0):
        state = rule.accumulate(state, np.array([value, 0], np.float32), weight=1.0)
    state = rule.accumulate(state, np.array([0, -7], np.float32), weight=1.0)
    np.testing.assert_allclose(rule.finalize(state), [2.0, -7.0])


def test_empty_and_uneven_clusterings_are_refused() -> None:
    rule = PerCluster(WeightedMean(), clusters=2)
    with pytest.raises(StrategyError, match="no update touched"):
        rule.finalize(rule.init(num_parameters=4))
    with pytest.raises(StrategyError, match="does not split"):
        rule.init(num_parameters=5)
    strategy = clustered_strategy(make_strategy("fedavg"), clusters=2)
    assert strategy.clusters == 2 and isinstance(strategy.aggregator, PerCluster)
    assert clustered_strategy(make_strategy("fedavg"), clusters=1).clusters == 1
    with pytest.raises(StrategyError, match="clustered already"):
        clustered_strategy(strategy, clusters=3)


@pytest.mark.parametrize(
    ("update", "metrics", "problem"),
    [
        ([1, 0, 0, 0], {"cluster": 0}, None),
        ([0, 0, 0, 0], {"cluster": 1}, None),
        ([1, 0, 1, 0], {"cluster": 0}, "changes cluster 1"),
        ([1, 0, 0, 0], {}, "names no cluster"),
        ([1, 0, 0, 0], {"cluster": 2}, "names no cluster"),
        ([1, 0, 0, 0], {"cluster": 0.5}, "names no cluster"),
    ],
)
def test_an_update_must_change_only_the_cluster_it_names(
    update: list[float], metrics: dict[str, Any], problem: str | None
) -> None:
    found = cluster_problem(np.array(update, np.float32), metrics, clusters=2)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_the_stack_splits_back_and_starts_apart() -> None:
    base = model(1, 2)
    stacked = perturbed_stack(base, clusters=3, seed=0, scale=0.1)
    first, *others = split_models(stacked, clusters=3)
    assert first.layout == base.layout and np.array_equal(first.vector, base.vector)
    assert all(not np.array_equal(other.vector, base.vector) for other in others)
    zero = perturbed_stack(model(0, 0), clusters=2, seed=0, scale=0.1)
    assert np.any(zero.vector != 0)
    again = perturbed_stack(base, clusters=3, seed=0, scale=0.1)
    assert again.sha256() == stacked.sha256()  # seeded
