"""The population's client ids: a lazy sequence that a million clients cost nothing to hold."""

from __future__ import annotations

import pytest

from shoal.simulation.population import ClientNames, client_name


def test_the_names_are_the_clients_of_the_population_in_order() -> None:
    names = ClientNames(1_000_000)
    assert len(names) == 1_000_000
    assert names[0] == client_name(0) and names[-1] == client_name(999_999)
    assert names[3:6] == [client_name(3), client_name(4), client_name(5)]
    assert list(ClientNames(3)) == [client_name(i) for i in range(3)]
    assert names.index("client-00042") == 42


def test_membership_needs_an_exact_name_within_the_population() -> None:
    names = ClientNames(100)
    assert "client-00099" in names
    for outsider in ("client-00100", "client-99", "client-0099", "server-00001", 7, None):
        assert outsider not in names
    with pytest.raises(ValueError, match="not a client"):
        names.index("client-00100")
    with pytest.raises(IndexError):
        names[100]


def test_an_empty_population() -> None:
    names = ClientNames(0)
    assert len(names) == 0 and list(names) == [] and "client-00000" not in names
    with pytest.raises(IndexError):
        names[0]
