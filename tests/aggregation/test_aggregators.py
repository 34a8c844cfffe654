"""Tests of the aggregation rules: properties, robustness bounds, Krum selection, bad input."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shoal.aggregation import (
    Aggregator,
    CoordinateMedian,
    Krum,
    TrimmedMean,
    WeightedMean,
    check_krum_condition,
    krum_scores,
    multi_krum_select,
    pairwise_squared_distances,
)
from shoal.core.errors import StrategyError

Vectors = list[np.ndarray]


def aggregate(
    rule: Aggregator, updates: Sequence[np.ndarray], weights: Sequence[float]
) -> np.ndarray:
    state = rule.init(num_parameters=updates[0].size)
    for update, weight in zip(updates, weights, strict=True):
        state = rule.accumulate(state, update, weight=weight)
    return rule.finalize(state)


def all_rules() -> list[Aggregator]:
    return [
        WeightedMean(),
        CoordinateMedian(),
        TrimmedMean(trim_ratio=0.2),
        Krum(num_byzantine=1, num_selected=1),
        Krum(num_byzantine=1, num_selected=2),
        Krum(num_byzantine=1, num_selected=None),
    ]


# Values on a grid of quarters: exact in float32, and squared distances are
# exact in float64, so ties in the references are real ties.
grid_values = st.integers(-48, 48).map(lambda quarters: quarters / 4)


@st.composite
def update_sets(draw: st.DrawFn, *, min_count: int = 1, max_count: int = 9) -> Vectors:
    count = draw(st.integers(min_count, max_count))
    size = draw(st.integers(1, 5))
    rows = draw(
        st.lists(
            st.lists(grid_values, min_size=size, max_size=size), min_size=count, max_size=count
        )
    )
    return [np.array(row, dtype=np.float32) for row in rows]


weights_for = st.lists(st.integers(1, 20).map(float), min_size=9, max_size=9)


# --- properties -----------------------------------------------------------------


@pytest.mark.parametrize("rule", all_rules(), ids=lambda rule: f"{rule.name}-{rule}")
@settings(max_examples=60, deadline=None)
@given(updates=update_sets(min_count=7), weights=weights_for, data=st.data())
def test_every_rule_is_invariant_to_arrival_order(
    rule: Aggregator, updates: Vectors, weights: list[float], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(updates))))
    weights = weights[: len(updates)]
    expected = aggregate(rule, updates, weights)
    shuffled = aggregate(rule, [updates[i] for i in order], [weights[i] for i in order])
    np.testing.assert_allclose(shuffled, expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=80, deadline=None)
@given(
    updates=update_sets(),
    weights=st.lists(st.floats(0.0, 1e4, allow_subnormal=False), min_size=9, max_size=9),
)
def test_weighted_mean_equals_numpy_average(updates: Vectors, weights: list[float]) -> None:
    weights = weights[: len(updates)]
    assume(sum(weights) > 1e-3)
    expected = np.average(np.stack(updates).astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(
        aggregate(WeightedMean(), updates, weights), expected, rtol=1e-5, atol=1e-4
    )


def test_weighted_mean_stays_accurate_over_many_large_updates() -> None:
    rng = np.random.default_rng(7)
    updates = [rng.standard_normal(50_000, dtype=np.float32) + 3 for _ in range(200)]
    weights = rng.uniform(1, 5000, 200)
    expected = np.average(np.stack(updates).astype(np.float64), axis=0, weights=weights)
    result = aggregate(WeightedMean(), updates, list(weights))
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=2e-6)


outlier_values = st.sampled_from([-3e38, -1e30, -1e6, 1e6, 1e30, 3e38]) | grid_values


@st.composite
def honest_and_outliers(draw: st.DrawFn, *, max_outliers: int) -> tuple[Vectors, Vectors]:
    size = draw(st.integers(1, 4))
    vectors = st.lists(grid_values, min_size=size, max_size=size)
    outliers = [
        np.array(row, np.float32)
        for row in draw(
            st.lists(st.lists(outlier_values, min_size=size, max_size=size), max_size=max_outliers)
        )
    ]
    floor = 2 * len(outliers) + 1
    honest = [
        np.array(row, np.float32)
        for row in draw(st.lists(vectors, min_size=floor, max_size=floor + 4))
    ]
    return honest, outliers


def assert_within_honest_range(result: np.ndarray, honest: Vectors) -> None:
    stacked = np.stack(honest)
    assert np.all(result >= stacked.min(axis=0))
    assert np.all(result <= stacked.max(axis=0))


@settings(max_examples=100, deadline=None)
@given(case=honest_and_outliers(max_outliers=4), data=st.data())
def test_median_stays_within_the_honest_range(
    case: tuple[Vectors, Vectors], data: st.DataObject
) -> None:
    honest, outliers = case  # f < n / 2 by construction
    updates = data.draw(st.permutations(honest + outliers))
    assert_within_honest_range(aggregate(CoordinateMedian(), updates, [1.0] * len(updates)), honest)


@settings(max_examples=100, deadline=None)
@given(case=honest_and_outliers(max_outliers=3), trim_ratio=st.floats(0.0, 0.49), data=st.data())
def test_trimmed_mean_stays_within_the_honest_range(
    case: tuple[Vectors, Vectors], trim_ratio: float, data: st.DataObject
) -> None:
    honest, outliers = case
    updates = data.draw(st.permutations(honest + outliers))
    assume(len(outliers) <= trim_ratio * len(updates))
    rule = TrimmedMean(trim_ratio=trim_ratio)
    assert_within_honest_range(aggregate(rule, updates, [1.0] * len(updates)), honest)


def test_trimmed_mean_drops_floor_of_ratio_times_n_from_each_side() -> None:
    updates = [np.array([value], np.float32) for value in (1, 2, 3, 4, 100, -100, 5)]
    # floor(0.3 * 7) = 2 dropped each side: -100, 1 and 100, 5 go; mean of 2, 3, 4.
    assert aggregate(TrimmedMean(trim_ratio=0.3), updates, [1.0] * 7)[0] == pytest.approx(3.0)
    assert aggregate(TrimmedMean(trim_ratio=0.0), updates, [1.0] * 7)[0] == pytest.approx(15 / 7)


def test_median_of_even_count_is_mean_of_the_middle_pair() -> None:
    updates = [np.array([value, -value], np.float32) for value in (4, 1, 3, 2)]
    np.testing.assert_array_equal(aggregate(CoordinateMedian(), updates, [1.0] * 4), [2.5, -2.5])


@pytest.mark.parametrize("count", [1, 2, 5, 10, 11, 40])
def test_the_coordinate_median_is_numpys_bit_for_bit_over_every_column_block(count: int) -> None:
    rng = np.random.default_rng(count)
    size = 3 * max(1024, (1 << 20) // count) + 7  # three column blocks and a bit
    updates = [(rng.normal(size=size) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)]
    updates += [(rng.normal(size=size) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
                for _ in range(count - 1)]  # fmt: skip
    updates[-1][:100] = updates[0][:100]  # ties
    expected = np.median(np.stack(updates), axis=0)
    np.testing.assert_array_equal(aggregate(CoordinateMedian(), updates, [1.0] * count), expected)
    trimmed = aggregate(TrimmedMean(trim_ratio=0.2), updates, [1.0] * count)
    kept = np.sort(np.stack(updates).astype(np.float64), axis=0)
    cut = math.floor(0.2 * count)
    reference = kept[cut : count - cut].mean(axis=0).astype(np.float32)
    np.testing.assert_allclose(trimmed, reference, rtol=1e-6)


# --- Krum -------------------------------------------------------------------------


@st.composite
def clustered_with_attackers(draw: st.DrawFn) -> tuple[Vectors, int, int]:
    """Honest updates within a small ball, f attackers far away (scattered or colluding)."""
    num_byzantine = draw(st.integers(0, 3))
    num_selected = draw(st.integers(1, 3))
    count = draw(st.integers(2 * num_byzantine + num_selected + 3, 14))
    size = draw(st.integers(1, 4))
    centre = np.array(draw(st.lists(grid_values, min_size=size, max_size=size)), np.float32)
    noise = st.lists(st.integers(-2, 2).map(lambda x: x / 4), min_size=size, max_size=size)
    honest = [centre + np.array(draw(noise), np.float32) for _ in range(count - num_byzantine)]
    colluding = draw(st.booleans())
    target = centre + np.float32(draw(st.sampled_from([-1, 1])) * 1000)
    attackers = [
        target
        if colluding
        else centre
        + np.array(
            draw(
                st.lists(
                    st.sampled_from([-5000.0, -800.0, 800.0, 5000.0]), min_size=size, max_size=size
                )
            ),
            np.float32,
        )
        for _ in range(num_byzantine)
    ]
    return honest + attackers, num_byzantine, num_selected


@settings(max_examples=100, deadline=None)
@given(case=clustered_with_attackers(), data=st.data())
def test_krum_and_multi_krum_select_only_honest_updates(
    case: tuple[Vectors, int, int], data: st.DataObject
) -> None:
    updates, num_byzantine, num_selected = case
    honest_count = len(updates) - num_byzantine
    order = data.draw(st.permutations(range(len(updates))))
    rule = Krum(num_byzantine=num_byzantine, num_selected=num_selected)
    state = rule.init(num_parameters=updates[0].size)
    for index in order:
        state = rule.accumulate(state, updates[index], weight=1.0)
    chosen = [order[position] for position in rule.selection(state)]
    assert len(chosen) == num_selected
    assert len(set(chosen)) == num_selected
    assert all(index < honest_count for index in chosen)
    expected = np.mean([updates[index] for index in chosen], axis=0)
    np.testing.assert_allclose(rule.finalize(state), expected, rtol=1e-6)


def brute_force_multi_krum(updates: Vectors, *, f: int, m: int) -> tuple[int, ...]:
    """Plain-Python Multi-Krum: exact distances, full sorts, lexicographic ties."""
    remaining, chosen = list(range(len(updates))), list[int]()
    while len(chosen) < m:
        scores = {}
        for i in remaining:
            distances = sorted(
                float(np.sum((updates[i].astype(np.float64) - updates[j]) ** 2))
                for j in remaining
                if j != i
            )
            scores[i] = sum(distances[: len(remaining) - f - 2])
        best = min(scores.values())
        pick = min((i for i in remaining if scores[i] == best), key=lambda i: tuple(updates[i]))
        chosen.append(pick)
        remaining.remove(pick)
    return tuple(chosen)


@settings(max_examples=150, deadline=None)
@given(updates=update_sets(min_count=4, max_count=10), data=st.data())
def test_multi_krum_matches_a_brute_force_reference(updates: Vectors, data: st.DataObject) -> None:
    n = len(updates)
    f = data.draw(st.integers(0, (n - 4) // 2))
    m = data.draw(st.integers(1, n - 2 * f - 3))
    rule = Krum(num_byzantine=f, num_selected=m)
    state = rule.init(num_parameters=updates[0].size)
    for update in updates:
        state = rule.accumulate(state, update, weight=1.0)
    assert rule.selection(state) == brute_force_multi_krum(updates, f=f, m=m)


def test_multi_krum_rescores_after_each_removal() -> None:
    points = [3.0, 14.0, 24.0, 47.0, 51.0, 75.0, 82.0, 94.0, 95.0]
    distances = pairwise_squared_distances([np.array([p], np.float32) for p in points])
    selection = multi_krum_select(distances, num_byzantine=1, num_selected=4)
    assert selection == (5, 3, 2, 6)
    # Taking the four best initial scores at once would choose differently.
    one_shot = np.argsort(krum_scores(distances, num_byzantine=1))[:4]
    assert set(one_shot.tolist()) == {5, 4, 3, 6}


def test_pairwise_distances_match_direct_computation_far_from_origin() -> None:
    rng = np.random.default_rng(3)
    updates = [(1e4 + rng.standard_normal(3000)).astype(np.float32) for _ in range(6)]
    direct = np.array([[np.sum((a.astype(np.float64) - b) ** 2) for b in updates] for a in updates])
    np.testing.assert_allclose(pairwise_squared_distances(updates), direct, rtol=1e-9, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 20), f=st.integers(0, 6), m=st.integers(1, 8))
def test_krum_condition_raises_exactly_when_violated(n: int, f: int, m: int) -> None:
    if 2 * f + 2 < n - m:
        check_krum_condition(num_updates=n, num_byzantine=f, num_selected=m)
    else:
        with pytest.raises(StrategyError, match=re.escape("2f + 2 < n - m")) as caught:
            check_krum_condition(num_updates=n, num_byzantine=f, num_selected=m)
        assert f"f={f}" in str(caught.value)
        assert f"m={m}" in str(caught.value)
        assert f"n={n}" in str(caught.value)


def test_krum_finalize_names_the_condition_when_too_few_updates() -> None:
    rule = Krum(num_byzantine=2, num_selected=1)
    state = rule.init(num_parameters=3)
    for value in range(7):
        state = rule.accumulate(state, np.full(3, value, np.float32), weight=1.0)
    with pytest.raises(StrategyError, match=r"2f \+ 2 < n - m, but f=2, m=1, n=7"):
        rule.finalize(state)
    state = rule.accumulate(state, np.full(3, 3, np.float32), weight=1.0)
    np.testing.assert_array_equal(rule.finalize(state), [3, 3, 3])


def test_multi_krum_auto_selects_as_many_as_the_condition_allows() -> None:
    rule = Krum(num_byzantine=1, num_selected=None)
    assert rule.name == "multikrum"
    state = rule.init(num_parameters=1)
    for value in range(10):
        state = rule.accumulate(state, np.array([value], np.float32), weight=1.0)
    assert len(rule.selection(state)) == 10 - 2 - 3


# --- bad input, empty and zero cases ----------------------------------------------


@pytest.mark.parametrize("rule", all_rules(), ids=lambda rule: rule.name)
def test_finalize_without_updates_raises(rule: Aggregator) -> None:
    with pytest.raises(StrategyError, match="no updates"):
        rule.finalize(rule.init(num_parameters=4))


@pytest.mark.parametrize("rule", all_rules(), ids=lambda rule: rule.name)
@pytest.mark.parametrize(
    ("update", "message"),
    [
        (np.array([1, np.nan, 3], np.float32), "NaN or infinite"),
        (np.array([1, 2, np.inf], np.float32), "NaN or infinite"),
        (np.array([-np.inf, 2, 3], np.float32), "NaN or infinite"),
        (np.ones(4, np.float32), "has 4 values, expected 3"),
        (np.ones(2, np.float32), "has 2 values, expected 3"),
        (np.ones(3, np.float64), "float32"),
        (np.ones((3, 1), np.float32), "1-D"),
        ([1.0, 2.0, 3.0], "1-D float32 vector, got list"),
    ],
)
def test_bad_updates_raise_and_leave_the_state_usable(
    rule: Aggregator, update: object, message: str
) -> None:
    good = np.array([1, 2, 3], np.float32)
    state = rule.accumulate(rule.init(num_parameters=3), good, weight=1.0)
    if rule.streaming and message == "NaN or infinite":
        # the streaming mean reads each update once: the coordinator rejects
        # non-finite updates where they enter, and finalize refuses a poisoned sum
        state = rule.accumulate(state, update, weight=1.0)  # type: ignore[arg-type]
        with pytest.raises(StrategyError, match="not finite"):
            rule.finalize(state)
        return
    with pytest.raises(StrategyError, match=re.escape(message)):
        rule.accumulate(state, update, weight=1.0)  # type: ignore[arg-type]
    if rule.streaming:
        np.testing.assert_array_equal(rule.finalize(state), good)


@pytest.mark.parametrize("rule", all_rules(), ids=lambda rule: rule.name)
@pytest.mark.parametrize(
    "weight", [-1.0, -1e-30, float("nan"), float("inf"), 1e39, True, "2", None]
)
def test_bad_weights_raise(rule: Aggregator, weight: object) -> None:
    state = rule.init(num_parameters=2)
    with pytest.raises(StrategyError, match="weight"):
        rule.accumulate(state, np.ones(2, np.float32), weight=weight)  # type: ignore[arg-type]


def test_weighted_mean_with_zero_total_weight_raises() -> None:
    rule = WeightedMean()
    state = rule.init(num_parameters=2)
    for _ in range(3):
        state = rule.accumulate(state, np.ones(2, np.float32), weight=0.0)
    with pytest.raises(StrategyError, match="3 updates sum to 0"):
        rule.finalize(state)


def test_weighted_mean_ignores_zero_weight_updates() -> None:
    updates = [np.array([2, 4], np.float32), np.array([100, 100], np.float32)]
    np.testing.assert_array_equal(aggregate(WeightedMean(), updates, [3.0, 0.0]), [2, 4])


def test_weighted_mean_refuses_a_consumed_state() -> None:
    rule = WeightedMean()
    first = rule.init(num_parameters=2)
    second = rule.accumulate(first, np.ones(2, np.float32), weight=1.0)
    with pytest.raises(StrategyError, match="already consumed"):
        rule.accumulate(first, np.ones(2, np.float32), weight=1.0)
    np.testing.assert_array_equal(rule.finalize(second), [1, 1])
    with pytest.raises(StrategyError, match="already consumed"):
        rule.finalize(second)


@pytest.mark.parametrize("rule", all_rules(), ids=lambda rule: rule.name)
def test_huge_but_finite_values_are_accepted(rule: Aggregator) -> None:
    # Their squared norm overflows float32: the fast finiteness test must fall back.
    updates = [np.array([3e38, -3e38], np.float32)] + [np.array([1, 2], np.float32)] * 6
    result = aggregate(rule, updates, [1e-30] + [1.0] * 6)
    assert result.shape == (2,)


def test_weighted_mean_reports_an_overflowing_sum() -> None:
    updates = [np.array([3e38, 1.0], np.float32)] * 2
    with pytest.raises(StrategyError, match="not finite"):
        aggregate(WeightedMean(), updates, [2.0, 2.0])


@pytest.mark.parametrize("rule", all_rules(), ids=lambda rule: rule.name)
def test_empty_vectors_aggregate_to_an_empty_vector(rule: Aggregator) -> None:
    updates = [np.zeros(0, np.float32)] * 7
    result = aggregate(rule, updates, [1.0] * 7)
    assert result.dtype == np.float32
    assert result.shape == (0,)


@pytest.mark.parametrize("rule", all_rules()[1:], ids=lambda rule: rule.name)
def test_buffered_rules_keep_their_own_copy(rule: Aggregator) -> None:
    update = np.ones(2, np.float32)
    state = rule.init(num_parameters=2)
    for _ in range(7):
        state = rule.accumulate(state, update, weight=1.0)
    update[:] = 1000
    np.testing.assert_array_equal(rule.finalize(state), [1, 1])


def test_single_update_passes_through_every_rule_that_accepts_one() -> None:
    update = np.array([0.5, -1.5, 2.25], np.float32)
    for rule in (WeightedMean(), CoordinateMedian(), TrimmedMean(trim_ratio=0.4)):
        np.testing.assert_array_equal(aggregate(rule, [update], [7.0]), update)


def test_names_and_streaming_flags() -> None:
    rules = {rule.name: rule.streaming for rule in all_rules()}
    assert rules == {
        "mean": True,
        "median": False,
        "trimmed_mean": False,
        "krum": False,
        "multikrum": False,
    }


@pytest.mark.parametrize("trim_ratio", [-0.1, 0.5, 0.7, float("nan"), "0.1"])
def test_trimmed_mean_rejects_bad_ratios(trim_ratio: object) -> None:
    with pytest.raises(StrategyError, match="trim_ratio"):
        TrimmedMean(trim_ratio=trim_ratio)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("num_byzantine", "num_selected", "message"),
    [
        (-1, 1, "num_byzantine"),
        (1.5, 1, "num_byzantine"),
        (True, 1, "num_byzantine"),
        (1, 0, "num_selected"),
        (1, 2.0, "num_selected"),
    ],
)
def test_krum_rejects_bad_settings(
    num_byzantine: object, num_selected: object, message: str
) -> None:
    with pytest.raises(StrategyError, match=message):
        Krum(num_byzantine=num_byzantine, num_selected=num_selected)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_parameters", [-1, 2.5, True])
def test_init_rejects_bad_sizes(num_parameters: object) -> None:
    for rule in all_rules():
        with pytest.raises(StrategyError, match="num_parameters"):
            rule.init(num_parameters=num_parameters)  # type: ignore[arg-type]


def test_krum_ties_break_by_content_not_arrival() -> None:
    # -5 and 5 tie for the best Krum score (1377); the smaller vector wins in any order.
    points = [-1.0, 1.0, -5.0, 5.0, -40.0, 40.0, 100.0]
    updates = [np.array([p], np.float32) for p in points]
    scores = krum_scores(pairwise_squared_distances(updates), num_byzantine=1)
    assert scores[2] == pytest.approx(1377, rel=1e-12)
    assert scores[3] == pytest.approx(1377, rel=1e-12)
    assert np.argsort(scores)[:2].tolist() in ([2, 3], [3, 2])
    for order in itertools.permutations(range(7), 4):
        arranged = [updates[i] for i in order] + [updates[i] for i in range(7) if i not in order]
        assert aggregate(Krum(num_byzantine=1), arranged, [1.0] * 7).tolist() == [-5.0]


def test_multi_krum_select_breaks_ties_by_lowest_index_by_default() -> None:
    updates = [np.array([p], np.float32) for p in (1.0, -1.0, 3.0, -3.0)] * 2
    distances = pairwise_squared_distances(updates)
    assert multi_krum_select(distances, num_byzantine=0, num_selected=1) == (0,)
    assert multi_krum_select(distances, num_byzantine=0, num_selected=1, tie_breaker=max) == (5,)
