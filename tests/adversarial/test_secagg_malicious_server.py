"""A malicious SecAgg+ server forges the survivor set to recover one client's update.

The honest clients are the real :class:`SecAggClient` machines; the server
(tests/support/malicious_secagg.py) runs the first stages honestly, then
shows different clients different survivor sets. Before the consistency
check, every attack here rebuilt the target's exact update (correlation
0.99999 at n = 10 and n = 30, default threshold). Now every honest client
it asks refuses, and what it collects rebuilds no mask of the target.
"""

from __future__ import annotations

import pytest

from shoal.core.errors import ProtocolError
from shoal.core.sharing import minimum_threshold, reconstruction_threshold
from support.malicious_secagg import Harvest, MaliciousServer, correlation

TARGET = 1


def _server(num_nodes: int, degree: int) -> MaliciousServer:
    threshold = reconstruction_threshold(degree=degree, num_nodes=num_nodes)
    return MaliciousServer(num_nodes, degree=degree, threshold=threshold)


def _assert_nothing_leaked(server: MaliciousServer, harvest: Harvest, fooled: set[int]) -> None:
    """The target's update stays hidden, and every client shown a forged set refused."""
    recovered = server.recover(TARGET, harvest)
    leak = None if recovered is None else correlation(recovered, server.updates[TARGET])
    assert recovered is None, f"the server rebuilt the target's update (correlation {leak})"
    assert fooled <= set(harvest.refused), "an honest client revealed shares for a forged set"
    assert not harvest.key_shares.get(TARGET), "someone revealed the target's mask key"


@pytest.mark.parametrize("num_nodes", [10, 30])
def test_the_harness_rebuilds_an_update_from_the_secrets_it_needs(num_nodes: int) -> None:
    """Control: given the shares the attack wants, the harness does recover the update."""
    server = _server(num_nodes, num_nodes - 1)
    harvest = Harvest()
    for holder, client in server.clients.items():
        for owner, row in client._held_shares.items():  # what a fooled holder would reveal
            book = harvest.seed_shares if owner == TARGET else harvest.key_shares
            book.setdefault(owner, {})[holder] = row[16:] if owner == TARGET else row[:16]
    recovered = server.recover(TARGET, harvest)
    assert recovered is not None
    assert correlation(recovered, server.updates[TARGET]) > 0.9999


@pytest.mark.parametrize("num_nodes", [10, 30])
def test_survived_to_the_targets_holders_dropped_for_its_neighbours(num_nodes: int) -> None:
    """Each neighbour hears "the target survived, every other neighbour of it dropped"."""
    server = _server(num_nodes, num_nodes - 1)
    everyone = frozenset(server.nodes)
    shown = {
        holder: everyone - (server.graph[TARGET] - {holder}) for holder in server.graph[TARGET]
    }
    harvest = server.attack(shown)
    _assert_nothing_leaked(server, harvest, set(shown))
    assert not harvest.seed_shares and not harvest.key_shares


def test_the_same_attack_on_a_sparse_graph_recruiting_signers_greedily() -> None:
    """With 40 clients of degree 8, the server recruits for each holder the signers it can."""
    server = _server(40, 8)
    everyone = frozenset(server.nodes)
    shown: dict[int, frozenset[int]] = {}
    for holder in sorted(server.graph[TARGET]):
        survivors = everyone - (server.graph[TARGET] - {holder})
        shown[holder] = survivors
        for signer in sorted(server.graph[holder] & survivors):
            shown.setdefault(signer, survivors)  # each signer can sign one set only
    harvest = server.attack(shown)
    recovered = server.recover(TARGET, harvest)
    assert recovered is None
    assert len(harvest.seed_shares.get(TARGET, {})) < server.session.threshold


@pytest.mark.parametrize("num_nodes", [10, 30])
def test_dropped_to_some_holders_survived_to_others(num_nodes: int) -> None:
    """The classic attack: half the holders reveal the target's seed, half its mask key."""
    with pytest.raises(ProtocolError, match="below the safe floor"):
        MaliciousServer(num_nodes, degree=num_nodes - 1, threshold=2)  # it used to work at 2
    server = _server(num_nodes, num_nodes - 1)
    assert server.session.threshold == minimum_threshold(num_nodes - 1)
    everyone = frozenset(server.nodes)
    told_survived = {TARGET, *range(2, 2 + num_nodes // 2)}
    shown = {
        holder: everyone if holder in told_survived else everyone - {TARGET}
        for holder in server.nodes
    }
    # at most one of the two sets gathers t signatures (here: the true one, a sum of all)
    _assert_nothing_leaked(server, server.attack(shown), set(server.nodes) - told_survived)


def test_an_honest_set_is_still_unmasked() -> None:
    """Control: shown one true set, every client reveals, and only for that set."""
    server = _server(10, 9)
    harvest = server.attack(dict.fromkeys(server.nodes, frozenset(server.nodes)))
    assert not harvest.refused
    assert set(harvest.seed_shares) == set(server.nodes) and not harvest.key_shares
    assert server.recover(TARGET, harvest) is None  # seeds alone leave the pairwise masks on
