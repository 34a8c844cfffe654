"""Cohort selection: sizes, determinism, and uniformity of the sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.coordinator.selection import (
    Stream,
    client_key,
    client_seed,
    cohort_size,
    round_rng,
    select_cohort,
)
from shoal.core import ConfigError


@pytest.mark.parametrize(
    ("target", "over", "size"), [(20, 1.3, 26), (10, 1.0, 10), (1, 1.3, 2), (3, 1.5, 5)]
)
def test_cohort_size(target: int, over: float, size: int) -> None:
    assert cohort_size(target=target, over_selection=over) == size


@pytest.mark.parametrize(("target", "over"), [(0, 1.3), (5, 0.9)])
def test_cohort_size_refuses_nonsense(target: int, over: float) -> None:
    with pytest.raises(ConfigError):
        cohort_size(target=target, over_selection=over)


@given(st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=40), st.integers(0, 50))
def test_selection_is_a_subset_of_the_right_size_whatever_the_order(
    ids: list[str], size: int
) -> None:
    forward = select_cohort(ids, size=size, rng=np.random.default_rng(1))
    backward = select_cohort(list(reversed(ids)), size=size, rng=np.random.default_rng(1))
    assert forward == backward
    assert len(forward) == min(size, len(ids)) and set(forward) <= set(ids)
    assert len(set(forward)) == len(forward)


def test_empty_population_gives_an_empty_cohort() -> None:
    assert select_cohort([], size=5, rng=np.random.default_rng(0)) == ()


def test_sample_is_uniform() -> None:
    ids = [f"c{index:03d}" for index in range(50)]
    counts = dict.fromkeys(ids, 0)
    trials = 4000
    for round_number in range(trials):
        rng = round_rng(seed=0, round_number=round_number, stream=Stream.SELECT_FIT)
        for client in select_cohort(ids, size=5, rng=rng):
            counts[client] += 1
    expected = trials * 5 / 50
    chi_square = sum((count - expected) ** 2 / expected for count in counts.values())
    assert chi_square < 90  # 49 degrees of freedom: p < 0.001 beyond about 86


def test_seeds_differ_by_client_round_and_run_and_are_stable() -> None:
    seeds = {
        client_seed(seed=s, round_number=r, client_id=c)
        for s in (0, 1)
        for r in (1, 2)
        for c in "ab"
    }
    assert len(seeds) == 8
    assert client_seed(seed=3, round_number=4, client_id="x") == client_seed(
        seed=3, round_number=4, client_id="x"
    )
    assert 0 <= client_key("anything") < 2**63
    assert not math.isnan(client_key("x"))
