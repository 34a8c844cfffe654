"""Imports of the ``shoal[datasets]`` extra, each failing with one line that names it.

Nothing here runs at import time: the core install imports
:mod:`shoal.datasets` freely (reading a folder of CSV files needs no extra)
and pays for ``datasets`` (several seconds to import) or ``pyarrow`` only
when a function needs them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from shoal.core.errors import MissingExtraError

EXTRA = "datasets"


def import_flwr_datasets() -> tuple[ModuleType, ModuleType]:
    """``(flwr_datasets.partitioner, datasets)``, or MissingExtraError naming the extra."""
    feature = "Partitioning with flwr-datasets"
    partitioner = _import("flwr_datasets.partitioner", package="flwr-datasets", feature=feature)
    return partitioner, _import("datasets", package="datasets", feature=feature)


def import_pyarrow() -> ModuleType:
    """``pyarrow``, or MissingExtraError naming the extra."""
    return _import("pyarrow", package="pyarrow", feature="Reading Arrow data")


def import_parquet() -> ModuleType:
    """``pyarrow.parquet``, or MissingExtraError naming the extra."""
    return _import("pyarrow.parquet", package="pyarrow", feature="Reading Parquet files")


def _import(module: str, *, package: str, feature: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(extra=EXTRA, package=package, feature=feature) from exc
