"""Property tests of the partitioners: disjoint covers, sizes, and the skew each promises."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.errors import DataError
from shoal.simulation.partition import (
    partition_dirichlet,
    partition_iid,
    partition_power_law,
    partition_shards,
)

seeds = st.integers(0, 2**32)


def assert_disjoint_cover(parts: list[npt.NDArray[np.int64]], num_examples: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    merged = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.sort(merged), np.arange(num_examples))


@st.composite
def labelled(draw: st.DrawFn) -> npt.NDArray[np.int64]:
    num_classes = draw(st.integers(1, 10))
    values = draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=300))
    return np.array(values, dtype=np.int64)


@given(num_examples=st.integers(1, 500), data=st.data(), seed=seeds)
def test_iid_is_a_balanced_disjoint_cover(
    num_examples: int, data: st.DataObject, seed: int
) -> None:
    num_clients = data.draw(st.integers(1, num_examples))
    parts = partition_iid(
        num_examples=num_examples, num_clients=num_clients, rng=np.random.default_rng(seed)
    )
    assert len(parts) == num_clients
    assert_disjoint_cover(parts, num_examples)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_deterministic_in_the_generator() -> None:
    first = partition_iid(num_examples=50, num_clients=4, rng=np.random.default_rng(1))
    again = partition_iid(num_examples=50, num_clients=4, rng=np.random.default_rng(1))
    other = partition_iid(num_examples=50, num_clients=4, rng=np.random.default_rng(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(("num_examples", "num_clients"), [(3, 4), (0, 1), (5, 0), (-1, 1)])
def test_iid_rejects_impossible_requests(num_examples: int, num_clients: int) -> None:
    with pytest.raises(DataError):
        partition_iid(
            num_examples=num_examples, num_clients=num_clients, rng=np.random.default_rng()
        )


@settings(max_examples=60, deadline=None)
@given(
    labels=labelled(),
    data=st.data(),
    alpha=st.floats(0.01, 1000.0),
    seed=seeds,
)
def test_dirichlet_is_a_disjoint_cover(
    labels: npt.NDArray[np.int64], data: st.DataObject, alpha: float, seed: int
) -> None:
    num_clients = data.draw(st.integers(1, min(20, labels.size)))
    parts = partition_dirichlet(
        labels, num_clients=num_clients, alpha=alpha, rng=np.random.default_rng(seed), min_size=0
    )
    assert len(parts) == num_clients
    assert_disjoint_cover(parts, labels.size)


@settings(max_examples=40, deadline=None)
@given(labels=labelled(), min_size=st.integers(1, 5), alpha=st.floats(0.1, 10.0), seed=seeds)
def test_dirichlet_respects_min_size_or_says_it_cannot(
    labels: npt.NDArray[np.int64], min_size: int, alpha: float, seed: int
) -> None:
    num_clients = max(1, labels.size // (3 * min_size))
    rng = np.random.default_rng(seed)
    if num_clients * min_size > labels.size:
        with pytest.raises(DataError, match="cannot give"):
            partition_dirichlet(
                labels, num_clients=num_clients, alpha=alpha, rng=rng, min_size=min_size
            )
        return
    try:
        parts = partition_dirichlet(
            labels, num_clients=num_clients, alpha=alpha, rng=rng, min_size=min_size
        )
    except DataError as error:
        if "attempts" not in str(error):
            raise
        return
    assert min(len(part) for part in parts) >= min_size
    assert_disjoint_cover(parts, labels.size)


def ten_balanced_classes(per_class: int) -> npt.NDArray[np.int64]:
    return np.repeat(np.arange(10), per_class)


def test_dirichlet_small_alpha_gives_each_client_few_classes() -> None:
    labels = ten_balanced_classes(100)
    parts = partition_dirichlet(
        labels, num_clients=20, alpha=0.05, rng=np.random.default_rng(0), min_size=1
    )
    classes_held = [len(np.unique(labels[part])) for part in parts]
    assert np.mean(classes_held) <= 3.0


def test_dirichlet_large_alpha_gives_each_client_the_global_mix() -> None:
    labels = ten_balanced_classes(100)
    parts = partition_dirichlet(
        labels, num_clients=20, alpha=1e4, rng=np.random.default_rng(0), min_size=1
    )
    for part in parts:
        shares = np.bincount(labels[part], minlength=10) / len(part)
        assert np.abs(shares - 0.1).max() < 0.05


def test_dirichlet_gives_up_after_the_allowed_attempts() -> None:
    labels = ten_balanced_classes(10)
    with pytest.raises(DataError, match="3 attempts"):
        partition_dirichlet(
            labels,
            num_clients=10,
            alpha=0.01,
            rng=np.random.default_rng(0),
            min_size=10,
            max_attempts=3,
        )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"num_clients": 11}, "10 examples"),
        ({"num_clients": 0}, "num_clients"),
        ({"min_size": 2, "num_clients": 6}, "at least 2"),
        ({"min_size": -1}, "min_size"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_dirichlet_rejects_impossible_requests(arguments: dict[str, float], message: str) -> None:
    settings_: dict[str, float] = {"num_clients": 2, "alpha": 1.0} | arguments
    with pytest.raises(DataError, match=message):
        partition_dirichlet(np.arange(10) % 3, rng=np.random.default_rng(0), **settings_)  # type: ignore[arg-type]


@pytest.mark.parametrize("labels", [np.zeros((2, 2), np.int64), np.array([0.5, 1.0])])
def test_partitioners_reject_malformed_labels(labels: npt.NDArray[np.generic]) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="labels"):
        partition_dirichlet(labels, num_clients=1, alpha=1.0, rng=rng)
    with pytest.raises(DataError, match="labels"):
        partition_shards(labels, num_clients=1, rng=rng)


@st.composite
def shard_aligned_labels(draw: st.DrawFn) -> tuple[npt.NDArray[np.int64], int, int]:
    """Labels whose class sizes are multiples of the shard size, so shards hold one class."""
    num_clients = draw(st.integers(1, 20))
    shards_per_client = draw(st.integers(1, 3))
    shard_size = draw(st.integers(1, 5))
    num_shards = num_clients * shards_per_client
    shard_classes = draw(st.lists(st.integers(0, 9), min_size=num_shards, max_size=num_shards))
    labels = np.repeat(np.array(shard_classes, dtype=np.int64), shard_size)
    order = np.random.default_rng(draw(seeds)).permutation(labels.size)
    return labels[order], num_clients, shards_per_client


@given(case=shard_aligned_labels(), seed=seeds)
def test_shards_give_each_client_at_most_its_shard_count_of_labels(
    case: tuple[npt.NDArray[np.int64], int, int], seed: int
) -> None:
    labels, num_clients, shards_per_client = case
    parts = partition_shards(
        labels,
        num_clients=num_clients,
        shards_per_client=shards_per_client,
        rng=np.random.default_rng(seed),
    )
    assert len(parts) == num_clients
    assert_disjoint_cover(parts, labels.size)
    assert all(len(np.unique(labels[part])) <= shards_per_client for part in parts)


@given(labels=labelled(), data=st.data(), seed=seeds)
def test_shards_cover_any_labels_with_near_equal_shards(
    labels: npt.NDArray[np.int64], data: st.DataObject, seed: int
) -> None:
    shards_per_client = data.draw(st.integers(1, 3))
    num_clients = data.draw(st.integers(1, max(1, labels.size // shards_per_client)))
    if num_clients * shards_per_client > labels.size:
        return
    parts = partition_shards(
        labels,
        num_clients=num_clients,
        shards_per_client=shards_per_client,
        rng=np.random.default_rng(seed),
    )
    assert_disjoint_cover(parts, labels.size)
    shard_size = labels.size // (num_clients * shards_per_client)
    for part in parts:
        assert shards_per_client * shard_size <= len(part) <= shards_per_client * (shard_size + 1)


def test_shards_on_balanced_digits_like_labels_give_two_classes_each() -> None:
    labels = ten_balanced_classes(60)
    parts = partition_shards(labels, num_clients=100, rng=np.random.default_rng(0))
    held = [len(np.unique(labels[part])) for part in parts]
    assert max(held) <= 2
    assert min(held) >= 1
    assert sum(h == 2 for h in held) > 50  # random shards rarely pair one class with itself


def test_shards_reject_impossible_requests() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(DataError):
        partition_shards(np.arange(5), num_clients=3, shards_per_client=2, rng=rng)
    with pytest.raises(DataError, match="shards_per_client"):
        partition_shards(np.arange(5), num_clients=1, shards_per_client=0, rng=rng)
    with pytest.raises(DataError, match="num_clients"):
        partition_shards(np.arange(5), num_clients=0, rng=rng)


@given(
    num_examples=st.integers(1, 2000),
    data=st.data(),
    exponent=st.floats(0.0, 3.0),
    seed=seeds,
)
def test_power_law_is_a_disjoint_cover_with_min_size(
    num_examples: int, data: st.DataObject, exponent: float, seed: int
) -> None:
    num_clients = data.draw(st.integers(1, min(50, num_examples)))
    min_size = data.draw(st.integers(0, num_examples // num_clients))
    parts = partition_power_law(
        num_examples=num_examples,
        num_clients=num_clients,
        exponent=exponent,
        min_size=min_size,
        rng=np.random.default_rng(seed),
    )
    assert len(parts) == num_clients
    assert_disjoint_cover(parts, num_examples)
    assert min(len(part) for part in parts) >= min_size


def test_power_law_sizes_follow_zipf() -> None:
    parts = partition_power_law(
        num_examples=10_000, num_clients=10, exponent=1.0, min_size=0, rng=np.random.default_rng(3)
    )
    sizes = np.sort([len(part) for part in parts])[::-1]
    ranks = np.arange(1, 11)
    expected = 10_000 / ranks / np.sum(1.0 / ranks)
    assert np.abs(sizes - expected).max() <= 1.0


def test_power_law_gives_the_largest_share_to_a_random_client() -> None:
    largest = {
        int(
            np.argmax(
                [
                    len(part)
                    for part in partition_power_law(
                        num_examples=1_000,
                        num_clients=10,
                        exponent=1.0,
                        rng=np.random.default_rng(seed),
                    )
                ]
            )
        )
        for seed in range(20)
    }
    assert len(largest) > 3


def test_power_law_exponent_zero_is_balanced() -> None:
    parts = partition_power_law(
        num_examples=103, num_clients=10, exponent=0.0, rng=np.random.default_rng(0)
    )
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"exponent": -0.5}, "exponent"),
        ({"exponent": float("inf")}, "exponent"),
        ({"num_clients": 11}, "10 examples"),
        ({"min_size": 3, "num_clients": 4}, "at least 3"),
    ],
)
def test_power_law_rejects_impossible_requests(arguments: dict[str, float], message: str) -> None:
    settings_: dict[str, float] = {"num_examples": 10, "num_clients": 2, "exponent": 1.0}
    with pytest.raises(DataError, match=message):
        partition_power_law(rng=np.random.default_rng(0), **(settings_ | arguments))  # type: ignore[arg-type]
