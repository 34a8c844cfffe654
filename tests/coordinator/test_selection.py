"""Cohort selection: sizes, determinism, uniformity, and stability when a candidate goes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.coordinator.selection import (
    SeededSampler,
    Stream,
    client_key,
    client_seed,
    cohort_priorities,
    cohort_size,
    select_cohort,
)
from shoal.core import ConfigError
from shoal.tasks import Phase


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
    forward = select_cohort(ids, size=size, seed=1, round_number=3)
    backward = select_cohort(list(reversed(ids)), size=size, seed=1, round_number=3)
    assert forward == backward
    assert len(forward) == min(size, len(ids)) and set(forward) <= set(ids)
    assert len(set(forward)) == len(forward)
    assert list(forward) == sorted(forward)


def test_empty_population_and_empty_cohort() -> None:
    assert select_cohort([], size=5, seed=0, round_number=1) == ()
    assert select_cohort(["a", "b"], size=0, seed=0, round_number=1) == ()


@given(
    st.lists(st.text(min_size=1, max_size=6), unique=True, min_size=1, max_size=40),
    st.integers(0, 45),
    st.integers(0, 2**32),
    st.integers(1, 500),
    st.data(),
)
def test_removing_a_candidate_that_was_not_drawn_changes_nothing(
    ids: list[str], size: int, seed: int, round_number: int, data: st.DataObject
) -> None:
    """What unlearning relies on: a run without an unselected client draws the same cohort."""
    cohort = select_cohort(ids, size=size, seed=seed, round_number=round_number)
    unselected = [client for client in ids if client not in cohort]
    if not unselected:
        return
    gone = data.draw(st.sampled_from(unselected))
    rest = [client for client in ids if client != gone]
    assert select_cohort(rest, size=size, seed=seed, round_number=round_number) == cohort


def test_removing_a_drawn_candidate_lets_exactly_one_other_in() -> None:
    ids = [f"c{index:03d}" for index in range(30)]
    cohort = select_cohort(ids, size=5, seed=7, round_number=2)
    rest = [client for client in ids if client != cohort[0]]
    after = select_cohort(rest, size=5, seed=7, round_number=2)
    assert len(set(after) - set(cohort)) == 1 and set(cohort) - set(after) == {cohort[0]}


def test_priorities_are_keyed_by_seed_round_and_stream() -> None:
    ids = [f"c{index:03d}" for index in range(20)]
    draws = {
        select_cohort(ids, size=5, seed=seed, round_number=round_number, stream=stream)
        for seed in (0, 1)
        for round_number in (1, 2)
        for stream in (Stream.SELECT_FIT, Stream.SELECT_EVALUATE)
    }
    assert len(draws) == 8
    alone = cohort_priorities(["c007"], seed=3, round_number=4, stream=Stream.SELECT_FIT)
    among = cohort_priorities(ids, seed=3, round_number=4, stream=Stream.SELECT_FIT)
    assert alone[0] == among[7]  # a priority depends on nobody else
    assert cohort_priorities([], seed=3, round_number=4, stream=Stream.SELECT_FIT).size == 0


def test_the_seeded_sampler_draws_by_phase_stream() -> None:
    ids = [f"c{index:03d}" for index in range(20)]
    sampler = SeededSampler(5)
    fit = sampler.draw(ids, round_number=2, phase=Phase.FIT, size=4, target=3)
    evaluate = sampler.draw(ids, round_number=2, phase=Phase.EVALUATE, size=4, target=3)
    assert fit.members == select_cohort(ids, size=4, seed=5, round_number=2)
    assert evaluate.members == select_cohort(
        ids, size=4, seed=5, round_number=2, stream=Stream.SELECT_EVALUATE
    )
    assert fit.target == 3


def test_sample_is_uniform() -> None:
    ids = [f"c{index:03d}" for index in range(50)]
    counts = dict.fromkeys(ids, 0)
    trials = 4000
    for round_number in range(trials):
        for client in select_cohort(ids, size=5, seed=0, round_number=round_number):
            counts[client] += 1
    expected = trials * 5 / 50
    chi_square = sum((count - expected) ** 2 / expected for count in counts.values())
    assert chi_square < 90  # 49 degrees of freedom: p < 0.001 beyond about 86


def test_pairs_are_uniform_too() -> None:
    """Without replacement and unbiased: each pair of 8 candidates is drawn together alike."""
    ids = [f"c{index}" for index in range(8)]
    counts: dict[tuple[str, ...], int] = {}
    trials = 5600
    for round_number in range(trials):
        pair = select_cohort(ids, size=2, seed=11, round_number=round_number)
        counts[pair] = counts.get(pair, 0) + 1
    expected = trials / math.comb(8, 2)
    assert len(counts) == math.comb(8, 2)
    chi_square = sum((count - expected) ** 2 / expected for count in counts.values())
    assert chi_square < 61  # 27 degrees of freedom: p < 0.0002 beyond 61


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
