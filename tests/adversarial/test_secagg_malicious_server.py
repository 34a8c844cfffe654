"""A malicious SecAgg+ server forges the unmask stage to recover one client's update.

The honest clients are the real :class:`SecAggClient` machines; the server
(tests/support/malicious_secagg.py) runs the first stages honestly, then
lies about who survived. Every honest client asked must refuse, and what
the server collects must not rebuild the target's masks.
"""

from __future__ import annotations

import pytest

from shoal.secure.loopback import reconstruction_threshold
from support.malicious_secagg import MaliciousServer, correlation

TARGET = 1


@pytest.mark.parametrize("num_nodes", [10, 30])
def test_survived_to_the_targets_holders_dropped_for_its_neighbours(num_nodes: int) -> None:
    """Each neighbour hears "the target survived, every other neighbour of it dropped"."""
    threshold = reconstruction_threshold(degree=num_nodes - 1, num_nodes=num_nodes)
    server = MaliciousServer(num_nodes, degree=num_nodes - 1, threshold=threshold)

    def forge(holder: int) -> tuple[frozenset[int], frozenset[int]] | None:
        if holder == TARGET:
            return None
        peers = server.graph[holder]
        survivors = frozenset({holder} | (peers & {TARGET}))
        dropped = frozenset((peers & server.graph[TARGET]) - {TARGET})
        return survivors, dropped

    harvest = server.unmask(forge)
    recovered = server.recover(TARGET, harvest)
    leak = None if recovered is None else correlation(recovered, server.updates[TARGET])
    assert recovered is None, f"the server rebuilt the target's update (correlation {leak})"
    assert set(harvest.refused) == set(server.nodes) - {TARGET}


@pytest.mark.parametrize("num_nodes", [10, 30])
def test_dropped_to_some_holders_survived_to_others(num_nodes: int) -> None:
    """The classic attack: half the holders reveal the target's seed, half its mask key."""
    server = MaliciousServer(num_nodes, degree=num_nodes - 1, threshold=2)
    told_survived = set(range(2, 2 + num_nodes // 2))

    def forge(holder: int) -> tuple[frozenset[int], frozenset[int]]:
        if holder == TARGET or holder in told_survived:
            return frozenset({holder, TARGET}), frozenset()
        return frozenset({holder}), frozenset({TARGET})

    harvest = server.unmask(forge)
    recovered = server.recover(TARGET, harvest)
    leak = None if recovered is None else correlation(recovered, server.updates[TARGET])
    assert recovered is None, f"the server rebuilt the target's update (correlation {leak})"
