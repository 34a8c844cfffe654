"""Pass 1's arithmetic: clients' moments average to the pooled statistics, impossible moments
are named, and a statistics file is read back exactly or refused in one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.errors import ClientError, ConfigError, DataError
from shoal.preprocessing import (
    BOUNDS_KEY,
    STATISTICS_FILE,
    FeatureBounds,
    FeatureStatistics,
    MomentsCheck,
    bounds_of,
    local_moments,
    moments_layout,
    read_statistics,
)

BOUNDS = FeatureBounds.of([0.0, -5.0, 100.0], [10.0, 5.0, 5000.0])


def pooled_weighted_mean(shares: list[np.ndarray], bounds: FeatureBounds) -> np.ndarray:
    """What the coordinator's weighted mean of the clients' moments is (by record count)."""
    moments = [local_moments(share, bounds) for share in shares]
    total = sum(count for _, count in moments)
    return sum(vector.astype(np.float64) * count for vector, count in moments) / total


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
)
def test_clients_moments_average_to_the_pooled_mean_and_variance(
    seed: int, sizes: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    scales = np.array([3.0, 2.0, 900.0])
    shares = [rng.normal([5.0, 0.0, 2500.0], scales, size=(n, 3)) for n in sizes]
    shares = [np.clip(share, BOUNDS.low, BOUNDS.high) for share in shares]  # within the bounds
    statistics = FeatureStatistics.from_moments(pooled_weighted_mean(shares, BOUNDS), BOUNDS)
    pooled = np.concatenate(shares)
    np.testing.assert_allclose(statistics.mean, pooled.mean(axis=0), rtol=1e-5, atol=1e-4)
    # float32 moments: the variance is good to a few 1e-8 of the squared range
    error = np.abs(statistics.variance - pooled.var(axis=0))
    assert (error <= 4e-7 * BOUNDS.width**2).all(), error / BOUNDS.width**2


def test_a_value_outside_its_bounds_counts_as_the_bound() -> None:
    moments, count = local_moments([[-100.0, 50.0, 1e9]], BOUNDS)
    assert count == 1
    statistics = FeatureStatistics.from_moments(moments, BOUNDS)
    assert statistics.mean.tolist() == [0.0, 5.0, 5000.0]
    assert statistics.variance.tolist() == [0.0, 0.0, 0.0]


def test_the_moments_are_in_the_layout_the_run_aggregates() -> None:
    layout = moments_layout(3)
    assert layout.names == ("mean", "mean_square")
    assert layout.size == 6
    assert layout.statistics == ((0, 3), (3, 6))  # never stepped by a server optimizer
    moments, _ = local_moments(np.ones((4, 3)) * [5.0, 0.0, 2550.0], BOUNDS)
    assert moments.dtype == np.float32
    np.testing.assert_allclose(moments, [0.5, 0.5, 0.5, 0.25, 0.25, 0.25])


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (np.zeros(3), r"shape \[3\], the statistics run counts \(records, 3\)"),
        (np.zeros((2, 4)), r"shape \[2, 4\]"),
        (np.array([["a", "b", "c"]]), "not numbers"),
        (np.array([[1.0, np.nan, 2.0]]), "NaN or infinite values: impute or drop them"),
        (np.array([[1.0, np.inf, 2.0]]), "NaN or infinite"),
    ],
)
def test_features_that_cannot_be_counted_are_refused(features: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        local_moments(features, BOUNDS)


def test_a_client_without_records_has_zero_moments_and_count() -> None:
    moments, count = local_moments(np.zeros((0, 3)), BOUNDS)
    assert count == 0 and not moments.any()


@pytest.mark.parametrize(
    ("low", "high", "features", "message"),
    [
        (0.0, 1.0, None, "give the number of features"),
        ([0.0, 1.0], [1.0], None, "lists of 2 values"),
        (0.0, 0.0, 2, "feature 0's bounds must be finite with high above low"),
        ([0.0, 2.0], [1.0, 1.0], None, "feature 1's bounds"),
        (-1e308, 1e308, 1, "feature 0's bounds"),  # a width past a float's range
        (0.0, 1.0, 0, "at least one feature"),
    ],
)
def test_bounds_that_cannot_scale_are_refused(
    low: float | list[float], high: float | list[float], features: int | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        FeatureBounds.of(low, high, features=features)


@pytest.mark.parametrize(
    ("moments", "message"),
    [
        ([1.5, 0.5], "feature 0: its mean is outside"),
        ([-0.1, 0.5], "feature 0: its mean is outside"),
        ([0.5, 1.2], "its mean square is outside"),
        ([0.5, 0.2], "below its squared mean"),  # a negative variance
        ([0.2, 0.5], "above its mean"),  # values in [0, 1] have u**2 <= u
    ],
)
def test_moments_no_records_give_are_named(moments: list[float], message: str) -> None:
    problem = MomentsCheck(1)(np.array(moments, np.float32))
    assert problem is not None and message in problem


def test_every_clients_own_moments_pass_the_check() -> None:
    rng = np.random.default_rng(7)
    check = MomentsCheck(3)
    for size in (1, 2, 5, 1000):
        moments, _ = local_moments(rng.uniform(-10, 6000, size=(size, 3)), BOUNDS)
        assert check(moments) is None
    constant, _ = local_moments(np.full((9, 3), [1 / 3, 0.1, 1234.5678]), BOUNDS)
    assert check(constant) is None  # float32 rounding of u**2 against u: within tolerance
    assert "shape [4]" in (check(np.zeros(4, np.float32)) or "")


def test_statistics_round_trip_through_their_file(tmp_path: Path) -> None:
    moments = np.array([0.5, 0.25, 0.125, 0.3, 0.0625, 0.02], np.float32)
    statistics = FeatureStatistics.from_moments(moments, BOUNDS, examples=40, clients=4)
    text = statistics.to_text()
    (tmp_path / STATISTICS_FILE).write_text(text)
    read, sha256 = read_statistics(tmp_path)  # the run folder, or the file itself
    assert sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert read_statistics(tmp_path / STATISTICS_FILE)[1] == sha256
    assert read.to_dict() == statistics.to_dict()
    assert (read.examples, read.clients) == (40, 4)
    scaler = read.scaler()
    np.testing.assert_array_equal(scaler.mean, statistics.mean)
    assert scaler.scale[0] == pytest.approx(np.sqrt(0.3 - 0.25) * 10)


def test_a_constant_feature_is_scaled_by_one() -> None:
    moments, _ = local_moments(np.full((5, 3), [2.5, 0.0, 2550.0]), BOUNDS)  # exact in float32
    scaler = FeatureStatistics.from_moments(moments, BOUNDS).scaler()
    assert scaler.scale.tolist() == [1.0, 1.0, 1.0]
    assert scaler.transform([[2.5, 0.0, 2550.0]]).tolist() == [[0.0, 0.0, 0.0]]


def test_float32_moments_leave_a_constant_feature_a_spread_far_below_its_range() -> None:
    """The documented precision: a value u**2 rounded to float32 against u's square."""
    moments, _ = local_moments(np.full((5, 3), [1 / 3, 0.1, 1234.5678]), BOUNDS)
    std = FeatureStatistics.from_moments(moments, BOUNDS).std
    assert (std <= 3e-4 * BOUNDS.width).all(), std / BOUNDS.width


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "not Shoal feature statistics"),
        (lambda d: d.update(mean=[0.0]), "mean and variance are 3 values each"),
        (lambda d: d.update(variance=[0.0, -1.0, 0.0]), "a variance is negative"),
        (lambda d: d.update(low="zero"), "'low' is a list of numbers"),
        (lambda d: d.update(high=[1.0, 1.0, 1.0]), "feature 2's bounds"),
        (lambda d: d.update(examples=1.5), "whole numbers"),
        (lambda d: d.update(mean=[True, 0.0, 0.0]), "'mean' is a list of numbers"),
    ],
)
def test_a_statistics_file_that_cannot_be_used_is_refused_in_one_line(
    tmp_path: Path, edit: object, message: str
) -> None:
    moments = np.array([0.5, 0.5, 0.5, 0.3, 0.3, 0.3], np.float32)
    data = FeatureStatistics.from_moments(moments, BOUNDS).to_dict()
    edit(data)  # type: ignore[operator]
    path = tmp_path / "statistics.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as caught:
        read_statistics(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "{",
        '{"format": NaN}',
        "[1, 2]",
        "[" * 200_000,
        '{"format": "shoal-feature-statistics/1", "low": [' + "9" * 400 + "]}",
    ],
)
def test_a_file_that_is_not_statistics_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "statistics.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="cannot be used"):
        read_statistics(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"statistics\.json cannot be read: No such file"):
        read_statistics(tmp_path)


def test_a_tasks_bounds_read_back_and_hostile_ones_are_one_client_error() -> None:
    assert bounds_of({BOUNDS_KEY: BOUNDS.text()}).high.tolist() == BOUNDS.high.tolist()
    assert bounds_of({}) is None
    for text, message in [
        ("[" * 200_000, "RecursionError"),
        ('{"low": [0], "high": [0]}', "feature 0's bounds must be finite with high above low"),
        ('{"low": [0], "high": [1], "x": 1}', "object of 'low' and 'high' only"),
        ('{"low": [0], "high": [1e999]}', "past a float's range"),
    ]:
        with pytest.raises(ClientError, match=message):
            bounds_of({BOUNDS_KEY: text})
    with pytest.raises(ClientError, match="came as int, not text"):
        bounds_of({BOUNDS_KEY: 3})


def test_a_statistics_client_counts_only_with_the_bounds_its_task_carries() -> None:
    from shoal.client import NumpyClient, SoftmaxRegression, StatisticsClient
    from shoal.tasks import FitConfig

    data = (np.array([[5.0, 0.0, 2550.0]]), np.array([0]))
    client = StatisticsClient(
        NumpyClient(SoftmaxRegression(num_features=3, num_classes=2), train_data=data), BOUNDS
    )
    with pytest.raises(ClientError, match="the task carries no feature bounds"):
        client.fit(client.get_parameters(), FitConfig(round=1))
    narrow = FeatureBounds.of(0.0, [20.0, 10.0, 10_000.0])  # the coordinator's, not its own
    result = client.fit(
        client.get_parameters(), FitConfig(round=1, extras={BOUNDS_KEY: narrow.text()})
    )
    assert result.num_examples == 1
    assert list(result.parameters.vector[:3]) == pytest.approx([0.25, 0.0, 0.255])
