"""The SecAgg+ communication graph: a random k-regular graph over the round's clients.

Bell et al. (2020) replace the complete graph of the original protocol with a
random sparse one: each client masks with, and shares its secrets among, its
k neighbours only, which cuts the cost from O(n) to O(k) per client. The
graph here is a Harary graph (each node joined to its k/2 nearest on a ring,
plus the opposite node when k is odd) over a random permutation of the
clients, drawn from the round's seed so that every party derives the same
graph. Degree n - 1 gives the complete graph of Bonawitz et al. (2017).

>>> graph = neighbour_graph(6, degree=2, seed=b"round-seed")
>>> all(len(neighbours) == 2 for neighbours in graph.values())
True
"""

from __future__ import annotations

import hashlib

import numpy as np

from shoal.core.errors import ConfigError
from shoal.core.sharing import default_degree, graph_degree

__all__ = ["Graph", "default_degree", "neighbour_graph"]

Graph = dict[int, frozenset[int]]


def neighbour_graph(num_nodes: int, *, degree: int, seed: bytes) -> Graph:
    """Neighbours of nodes 1..num_nodes in a random ``degree``-regular graph.

    ``degree`` is capped at num_nodes - 1 (the complete graph). When both
    the degree and the number of nodes are odd no regular graph exists, and
    every node gets degree + 1.
    """
    if num_nodes < 0:
        raise ConfigError(f"the graph needs a non-negative node count, got {num_nodes}")
    if degree < 1 and num_nodes > 1:
        raise ConfigError(f"secure_aggregation.degree must be >= 1, got {degree}")
    nodes = list(range(1, num_nodes + 1))
    degree = graph_degree(num_nodes, degree)
    if degree >= num_nodes - 1:
        return {node: frozenset(n for n in nodes if n != node) for node in nodes}
    generator = np.random.Generator(np.random.PCG64(int.from_bytes(_digest(seed), "big")))
    ring = [nodes[i] for i in generator.permutation(num_nodes)]
    neighbours: dict[int, set[int]] = {node: set() for node in nodes}
    for position, node in enumerate(ring):
        for offset in range(1, degree // 2 + 1):
            other = ring[(position + offset) % num_nodes]
            neighbours[node].add(other)
            neighbours[other].add(node)
        if degree % 2 == 1:
            other = ring[(position + num_nodes // 2) % num_nodes]
            neighbours[node].add(other)
            neighbours[other].add(node)
    return {node: frozenset(found) for node, found in neighbours.items()}


def _digest(seed: bytes) -> bytes:
    return hashlib.sha256(b"shoal-secagg-graph" + seed).digest()[:16]
