"""The threshold floor and the dropout bound of SecAgg+ sharing: exact values and properties."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core import ConfigError
from shoal.core.sharing import (
    MAX_ROUND_FAILURE,
    binomial_below,
    default_degree,
    degree_needed,
    graph_degree,
    minimum_threshold,
    reconstruction_threshold,
    round_failure_bound,
)


@pytest.mark.parametrize(
    ("neighbours", "floor"), [(0, 1), (1, 2), (2, 2), (3, 3), (6, 4), (7, 5), (19, 11)]
)
def test_the_floor_is_more_than_half_of_the_holders(neighbours: int, floor: int) -> None:
    assert minimum_threshold(neighbours) == floor


def test_bad_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        minimum_threshold(-1)
    with pytest.raises(ConfigError, match=r"safe floor 0\.5"):
        reconstruction_threshold(degree=7, num_nodes=20, fraction=0.3)
    with pytest.raises(ConfigError, match="below 1"):
        reconstruction_threshold(degree=7, num_nodes=20, fraction=1.0)
    with pytest.raises(ConfigError, match="dropout"):
        round_failure_bound(num_nodes=5, degree=4, threshold=3, dropout=1.5)


def test_odd_degree_over_odd_n_gets_one_more_neighbour_and_the_empty_cases() -> None:
    assert graph_degree(21, 7) == 8 and graph_degree(20, 7) == 7 and graph_degree(5, 9) == 4
    assert graph_degree(0, 3) == 0 and graph_degree(1, 3) == 0
    assert default_degree(1) == 1 and default_degree(20) == 19 and default_degree(1000) == 31
    assert round_failure_bound(num_nodes=1, degree=1, threshold=1, dropout=0.5) == 0.0
    assert round_failure_bound(num_nodes=20, degree=7, threshold=5, dropout=0.0) == 0.0


@settings(max_examples=50, deadline=None)
@given(count=st.integers(0, 12), successes=st.integers(0, 14), probability=st.floats(0, 1))
def test_binomial_below_is_the_sum_over_every_outcome(
    count: int, successes: int, probability: float
) -> None:
    direct = sum(
        probability ** sum(outcome) * (1 - probability) ** (count - sum(outcome))
        for outcome in itertools.product((0, 1), repeat=count)
        if sum(outcome) < successes
    )
    assert binomial_below(count, successes, probability) == pytest.approx(direct, abs=1e-12)


@pytest.mark.parametrize(("nodes", "dropout"), [(10, 0.1), (20, 0.3), (30, 0.45)])
def test_the_complete_graph_fails_exactly_when_fewer_than_t_answer(
    nodes: int, dropout: float
) -> None:
    threshold = reconstruction_threshold(degree=nodes - 1, num_nodes=nodes)
    exact = sum(
        math.comb(nodes, alive) * (1 - dropout) ** alive * dropout ** (nodes - alive)
        for alive in range(threshold)
    )
    bound = round_failure_bound(
        num_nodes=nodes, degree=nodes - 1, threshold=threshold, dropout=dropout
    )
    assert bound == pytest.approx(exact)


@pytest.mark.parametrize(("nodes", "dropout"), [(20, 0.1), (20, 0.3), (100, 0.1), (100, 0.3)])
def test_the_degree_needed_is_the_smallest_within_the_bound(nodes: int, dropout: float) -> None:
    needed = degree_needed(num_nodes=nodes, fraction=0.5, dropout=dropout)
    assert needed is not None

    def failure(degree: int) -> float:
        threshold = reconstruction_threshold(degree=degree, num_nodes=nodes)
        return round_failure_bound(
            num_nodes=nodes, degree=degree, threshold=threshold, dropout=dropout
        )

    assert failure(needed) <= MAX_ROUND_FAILURE
    assert needed == 1 or failure(needed - 1) > MAX_ROUND_FAILURE


def test_no_degree_when_even_the_complete_graph_fails_too_often() -> None:
    assert degree_needed(num_nodes=6, fraction=0.5, dropout=0.4) is None
