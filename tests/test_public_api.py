"""Every package re-exports its public names with a sorted ``__all__``."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "shoal.aggregation",
    "shoal.cli",
    "shoal.client",
    "shoal.coordinator",
    "shoal.registry",
    "shoal.privacy",
    "shoal.secure",
    "shoal.core",
    "shoal.dashboard",
    "shoal.datasets",
    "shoal.features",
    "shoal.preprocessing",
    "shoal.governance",
    "shoal.simulation",
    "shoal.telemetry",
    "shoal.transport",
]


def isort_style(name: str) -> tuple[int, str]:
    """Constants, then classes, then functions: the order ruff's RUF022 keeps."""
    kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return kind, name


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_importable(name: str) -> None:
    package = importlib.import_module(name)
    exported = list(package.__all__)
    assert exported == sorted(exported, key=isort_style)
    assert len(set(exported)) == len(exported)
    for symbol in exported:
        assert hasattr(package, symbol), f"{name} lacks {symbol}"
