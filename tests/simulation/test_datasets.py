"""Tests of the digits split and the FedProx synthetic federation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.errors import DataError
from shoal.simulation.datasets import (
    SYNTHETIC_VARIANCES,
    Dataset,
    SyntheticFederation,
    load_digits_split,
    sample_synthetic_examples,
    synthetic_global_model,
)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits_split(test_fraction=0.25, seed=3)


def test_digits_split_sizes_types_and_range(digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    assert len(train) + len(test) == 1797
    assert len(test) == 450  # ceil(0.25 * 1797), scikit-learn's rounding
    for part in (train, test):
        assert part.features.dtype == np.float32
        assert part.labels.dtype == np.int64
        assert part.features.shape[1] == 64
        assert part.num_classes == 10
        assert part.features.min() >= 0.0
        assert part.features.max() <= 1.0
    assert train.features.max() == 1.0


def test_digits_split_is_stratified(digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    totals = np.bincount(train.labels, minlength=10) + np.bincount(test.labels, minlength=10)
    expected = totals * 0.25
    assert np.all(np.abs(np.bincount(test.labels, minlength=10) - expected) <= 1.0)


def test_digits_split_is_deterministic_in_seed(digits: tuple[Dataset, Dataset]) -> None:
    again, _ = load_digits_split(test_fraction=0.25, seed=3)
    other, _ = load_digits_split(test_fraction=0.25, seed=4)
    np.testing.assert_array_equal(digits[0].features, again.features)
    assert not np.array_equal(digits[0].labels, other.labels)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_digits_split_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(DataError, match="test_fraction"):
        load_digits_split(test_fraction=fraction, seed=0)


def test_dataset_validates_its_arrays() -> None:
    features = np.zeros((3, 2), np.float32)
    with pytest.raises(DataError, match="float32"):
        Dataset(features.astype(np.float64), np.zeros(3, np.int64), 2)
    with pytest.raises(DataError, match="int64"):
        Dataset(features, np.zeros(3, np.int32), 2)
    with pytest.raises(DataError, match="labels"):
        Dataset(features, np.zeros(2, np.int64), 2)
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        Dataset(features, np.array([0, 1, 2]), 2)
    empty = Dataset(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), 2)
    assert len(empty) == 0
    assert empty.num_features == 2


def test_dataset_subset_copies_the_chosen_rows() -> None:
    data = Dataset(np.arange(8, dtype=np.float32).reshape(4, 2), np.array([0, 1, 0, 1]), 2)
    part = data.subset(np.array([3, 1]))
    np.testing.assert_array_equal(part.labels, [1, 1])
    np.testing.assert_array_equal(part.features, [[6, 7], [2, 3]])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), k=st.integers(0, 9_999), iid=st.booleans())
def test_synthetic_devices_have_the_reference_shapes(seed: int, k: int, iid: bool) -> None:
    beta = 0.0 if iid else 1.0
    federation = SyntheticFederation(
        alpha=beta, beta=beta, iid=iid, num_devices=10_000, seed=seed, max_samples=2_000
    )
    train, test = federation.device(k)
    total = federation.num_samples(k)
    assert 50 <= total <= 2_000
    assert len(train) + len(test) == total
    assert len(train) == int(0.8 * total) == federation.num_train_samples(k)
    for part in (train, test):
        assert part.features.shape[1] == 60
        assert part.features.dtype == np.float32
        assert part.num_classes == 10
        assert part.labels.min() >= 0
        assert part.labels.max() < 10


def test_synthetic_device_depends_only_on_seed_and_index() -> None:
    alone = SyntheticFederation(alpha=0.5, beta=0.5, num_devices=100, seed=11)
    crowded = SyntheticFederation(alpha=0.5, beta=0.5, num_devices=100, seed=11)
    for k in (99, 0, 50, 7):
        crowded.device(k)
    first, second = alone.device(42), crowded.device(42)
    np.testing.assert_array_equal(first.train.features, second.train.features)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)
    other_seed = SyntheticFederation(alpha=0.5, beta=0.5, num_devices=100, seed=12).device(42)
    assert not np.array_equal(first.train.features[:5], other_seed.train.features[:5])
    assert not np.array_equal(alone.device(41).train.features[:5], first.train.features[:5])


def test_synthetic_iid_devices_share_one_model_and_non_iid_do_not() -> None:
    iid = SyntheticFederation(iid=True, num_devices=10, seed=5)
    np.testing.assert_array_equal(iid.device_model(0)[0], iid.device_model(9)[0])
    np.testing.assert_array_equal(iid.device_model(0)[1], iid.device_model(9)[1])
    skewed = SyntheticFederation(alpha=1.0, beta=1.0, num_devices=10, seed=5)
    assert not np.allclose(skewed.device_model(0)[0], skewed.device_model(9)[0])


@pytest.mark.parametrize("iid", [True, False])
def test_synthetic_labels_are_the_argmax_of_the_device_model(iid: bool) -> None:
    federation = SyntheticFederation(
        alpha=0.0 if iid else 1.0, beta=0.0 if iid else 1.0, iid=iid, num_devices=5, seed=1
    )
    for k in range(5):
        weight, bias = federation.device_model(k)
        data = federation.device_dataset(k)
        predicted = np.argmax(data.features.astype(np.float64) @ weight + bias, axis=1)
        # float32 rounding of x may flip a near-tie; anything more is a wrong model.
        assert np.mean(predicted == data.labels) >= 0.995


def test_synthetic_beta_shifts_each_device_feature_mean() -> None:
    def spread_of_device_means(beta: float) -> float:
        federation = SyntheticFederation(
            alpha=0.0, beta=beta, num_devices=40, seed=2, max_samples=60
        )
        means = [federation.device_dataset(k).features.mean() for k in range(40)]
        return float(np.std(means))

    # Without beta each device's mean is an average of 60 N(0, 1) draws (std ~0.13).
    assert spread_of_device_means(0.0) < 0.4
    assert spread_of_device_means(5.0) > 2.5


def test_synthetic_alpha_shifts_each_device_model() -> None:
    def spread_of_model_means(alpha: float) -> float:
        federation = SyntheticFederation(alpha=alpha, beta=0.0, num_devices=40, seed=2)
        return float(np.std([federation.device_model(k)[0].mean() for k in range(40)]))

    assert spread_of_model_means(0.0) < 0.2
    assert spread_of_model_means(5.0) > 2.5


def test_synthetic_sample_counts_follow_lognormal_4_2_plus_50() -> None:
    federation = SyntheticFederation(alpha=0.0, beta=0.0, num_devices=4_000, seed=9)
    counts = np.array([federation.num_samples(k) for k in range(4_000)])
    assert counts.min() >= 50
    # lognormal(4, 2) has median e^4 ~ 55 and one-sigma quantiles e^2 ~ 7.4, e^6 ~ 403.
    low, median, high = np.quantile(counts - 50, [0.1587, 0.5, 0.8413])
    assert 5 <= low <= 10
    assert 48 <= median <= 62
    assert 330 <= high <= 490


def test_synthetic_max_samples_caps_every_device() -> None:
    capped = SyntheticFederation(alpha=0.0, beta=0.0, num_devices=500, seed=9, max_samples=80)
    free = SyntheticFederation(alpha=0.0, beta=0.0, num_devices=500, seed=9)
    counts = [(capped.num_samples(k), free.num_samples(k)) for k in range(500)]
    assert all(c == min(f, 80) for c, f in counts)
    assert max(f for _, f in counts) > 80


def test_synthetic_feature_covariance_is_diag_j_to_the_minus_1_2() -> None:
    weight, bias = synthetic_global_model(np.random.default_rng(0))
    data = sample_synthetic_examples(
        np.random.default_rng(1),
        mean_x=np.zeros(60),
        weight=weight,
        bias=bias,
        num_samples=20_000,
    )
    covariance = np.cov(data.features.astype(np.float64), rowvar=False)
    # The sampling error of a variance estimate is about sqrt(2 / n) ~ 1%.
    np.testing.assert_allclose(np.diag(covariance), SYNTHETIC_VARIANCES, rtol=0.05)
    scale = np.sqrt(np.outer(SYNTHETIC_VARIANCES, SYNTHETIC_VARIANCES))
    off_diagonal = (covariance / scale)[~np.eye(60, dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.04


def test_synthetic_large_iid_device_has_the_reference_x_distribution() -> None:
    federation = SyntheticFederation(iid=True, num_devices=2_000, seed=4)
    k = next(k for k in range(2_000) if federation.num_samples(k) > 4_000)
    features = federation.device_dataset(k).features.astype(np.float64)
    np.testing.assert_allclose(features.var(axis=0), SYNTHETIC_VARIANCES, rtol=0.1)
    assert np.abs(features.mean(axis=0) / np.sqrt(SYNTHETIC_VARIANCES)).max() < 0.1


def test_synthetic_test_fraction_zero_keeps_everything_for_training() -> None:
    federation = SyntheticFederation(num_devices=3, seed=0, test_fraction=0.0)
    train, test = federation.device(1)
    assert len(test) == 0
    assert len(train) == federation.num_samples(1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"alpha": -1.0}, "standard deviations"),
        ({"beta": float("nan")}, "standard deviations"),
        ({"iid": True, "alpha": 1.0}, "IID"),
        ({"num_devices": 0}, "num_devices"),
        ({"seed": -1}, "seed"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"max_samples": 0}, "max_samples"),
    ],
)
def test_synthetic_rejects_bad_arguments(arguments: dict[str, object], message: str) -> None:
    settings_ = {"num_devices": 3, "seed": 0} | arguments
    with pytest.raises(DataError, match=message):
        SyntheticFederation(**settings_)  # type: ignore[arg-type]


def test_synthetic_rejects_device_indices_outside_the_federation() -> None:
    federation = SyntheticFederation(num_devices=3, seed=0)
    for k in (-1, 3):
        with pytest.raises(DataError, match="device index"):
            federation.device(k)
        with pytest.raises(DataError, match="device index"):
            federation.num_samples(k)
