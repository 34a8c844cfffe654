"""The SecAgg+ graph: regular, symmetric, seeded, complete at degree n - 1."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core import ConfigError
from shoal.secure.graph import default_degree, neighbour_graph


@settings(max_examples=60, deadline=None)
@given(num_nodes=st.integers(2, 60), degree=st.integers(1, 70))
def test_graph_is_regular_and_symmetric(num_nodes: int, degree: int) -> None:
    graph = neighbour_graph(num_nodes, degree=degree, seed=b"s")
    assert set(graph) == set(range(1, num_nodes + 1))
    expected = min(degree + (degree % 2) * (num_nodes % 2), num_nodes - 1)
    for node, neighbours in graph.items():
        assert node not in neighbours
        assert len(neighbours) == expected
        assert all(node in graph[other] for other in neighbours)


def test_full_degree_is_the_complete_graph_and_seeds_matter() -> None:
    graph = neighbour_graph(5, degree=4, seed=b"s")
    assert all(len(neighbours) == 4 for neighbours in graph.values())
    sparse = [neighbour_graph(40, degree=6, seed=bytes([i])) for i in range(3)]
    assert sparse[0] == neighbour_graph(40, degree=6, seed=bytes([0]))
    assert sparse[0] != sparse[1]


def test_empty_single_and_bad_degrees() -> None:
    assert neighbour_graph(0, degree=3, seed=b"") == {}
    assert neighbour_graph(1, degree=3, seed=b"") == {1: frozenset()}
    with pytest.raises(ConfigError, match="degree"):
        neighbour_graph(5, degree=0, seed=b"")
    with pytest.raises(ConfigError):
        neighbour_graph(-1, degree=2, seed=b"")


@pytest.mark.parametrize(
    ("nodes", "degree"), [(1, 1), (2, 1), (20, 19), (32, 31), (1000, 31), (10**6, 40)]
)
def test_default_degree_is_complete_when_small_then_about_two_log2_n(
    nodes: int, degree: int
) -> None:
    assert default_degree(nodes) == degree
