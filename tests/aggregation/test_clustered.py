"""Splitting one model into cluster models: the drift's groups merged to at most k, and each
group's model the round as its own clients alone would have played it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.aggregation.clustered import group_models, merged_groups
from shoal.core import StrategyError


def test_each_group_steps_the_previous_model_by_its_own_mean() -> None:
    previous = np.array([1.0, 1.0, 1.0], np.float32)
    updates = np.array([[1, 0, 0], [3, 0, 0], [0, 0, 6]], np.float32)
    weights = [1.0, 3.0, 2.0]
    aggregate = (np.array(weights) @ updates / sum(weights)).astype(np.float32)
    models = group_models(
        previous + aggregate, aggregate, updates, groups=[0, 0, 1], weights=weights
    )
    # group 0: 1 + (1 + 9) / 4; group 1: 1 + 6
    np.testing.assert_allclose(models, [[3.5, 1, 1], [1, 1, 7]], rtol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(1, 50)), min_size=1, max_size=12),
    st.integers(0, 2**16),
)
def test_the_groups_weighted_average_is_the_rounds_model(
    members: list[tuple[int, int]], seed: int
) -> None:
    """Under FedAvg the example-weighted average of the group models is the round's model."""
    present = sorted({group for group, _ in members})
    groups = [present.index(group) for group, _ in members]
    weights = np.array([weight for _, weight in members], np.float64)
    updates = np.random.default_rng(seed).normal(size=(len(members), 5)).astype(np.float32)
    aggregate = (weights @ updates / weights.sum()).astype(np.float32)
    model = np.random.default_rng(seed + 1).normal(size=5).astype(np.float32)
    models = group_models(model, aggregate, updates, groups=groups, weights=list(weights))
    assert models.shape == (len(present), 5) and models.dtype == np.float32
    mass = np.array([weights[np.array(groups) == g].sum() for g in range(len(present))])
    np.testing.assert_allclose(mass @ models / mass.sum(), model, atol=1e-4)


def test_bad_groups_and_weights_are_refused() -> None:
    updates = np.ones((2, 3), np.float32)
    zero = np.zeros(3, np.float32)
    with pytest.raises(StrategyError, match="holds no update"):
        group_models(zero, zero, updates, groups=[0, 2], weights=[1, 1])
    with pytest.raises(StrategyError, match="positive weights"):
        group_models(zero, zero, updates, groups=[0, 1], weights=[1, 0])
    with pytest.raises(StrategyError, match="positive weights"):
        group_models(zero, zero, np.ones((0, 3), np.float32), groups=[], weights=[])
    with pytest.raises(StrategyError, match="one group and one weight"):
        group_models(zero, zero, updates, groups=[0], weights=[1, 1])
    with pytest.raises(StrategyError, match="4 values, expected 3"):
        group_models(np.zeros(4, np.float32), zero, updates, groups=[0, 1], weights=[1, 1])


def test_groups_are_numbered_by_size_and_the_smallest_joins_the_nearest() -> None:
    day, night, dusk = np.eye(3, dtype=np.float32)
    dusk = (0.2 * day + night).astype(np.float32)  # closer to night than to day
    updates = np.stack([day, 5 * night, night, dusk, day, day, 2 * day])
    labels = [2, 0, 0, 1, 2, 2, 2]  # the drift's labels, three groups
    assert merged_groups(labels, updates, clusters=3) == (0, 1, 1, 2, 0, 0, 0)  # by size
    assert merged_groups(labels, updates, clusters=2) == (0, 1, 1, 1, 0, 0, 0)  # dusk: night
    assert merged_groups(labels, updates, clusters=1) == (0,) * 7
    assert merged_groups([], np.zeros((0, 3), np.float32), clusters=2) == ()
    with pytest.raises(StrategyError, match="one label per update"):
        merged_groups([0], updates, clusters=2)
    with pytest.raises(StrategyError, match="at least 1"):
        merged_groups(labels, updates, clusters=0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=20), st.integers(1, 6), st.integers(0, 99))
def test_merging_keeps_each_group_whole_and_at_most_k(
    labels: list[int], clusters: int, seed: int
) -> None:
    updates = np.random.default_rng(seed).normal(size=(len(labels), 4)).astype(np.float32)
    merged = merged_groups(labels, updates, clusters=clusters)
    assert set(merged) == set(range(min(clusters, len(set(labels)))))
    for label in set(labels):  # a drift cluster is never torn apart
        assert len({group for group, old in zip(merged, labels, strict=True) if old == label}) == 1
    sizes = [merged.count(group) for group in sorted(set(merged))]
    assert sizes == sorted(sizes, reverse=True)
