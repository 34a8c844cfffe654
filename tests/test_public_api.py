"""Every package re-exports its public names with a sorted ``__all__``."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "shoal.aggregation",
    "shoal.cli",
    "shoal.client",
    "shoal.coordinator",
    "shoal.core",
    "shoal.simulation",
    "shoal.telemetry",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_importable(name: str) -> None:
    package = importlib.import_module(name)
    exported = list(package.__all__)
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported)
    for symbol in exported:
        assert hasattr(package, symbol), f"{name} lacks {symbol}"
