"""flwr-datasets' partitioners by name: the options each takes, checked, and the instance built.

=================  ===========================================  ===============================
name               flwr-datasets class                          options (default)
=================  ===========================================  ===============================
``iid``            ``IidPartitioner``                           num_partitions
``dirichlet``      ``DirichletPartitioner`` (label skew)        num_partitions, alpha (0.5),
                                                                min_partition_size (1)
``shards``         ``ShardPartitioner`` (FedAvg's split)        num_partitions,
                                                                shards_per_partition (2)
``pathological``   ``PathologicalPartitioner`` (k classes each) num_partitions,
                                                                classes_per_partition (2)
``natural_id``     ``NaturalIdPartitioner`` (one id, one part)  partition_by (the id column)
``linear``         ``LinearPartitioner`` (size ~ i)             num_partitions
``exponential``    ``ExponentialPartitioner`` (size ~ e^i)      num_partitions
=================  ===========================================  ===============================

An option that the chosen partitioner does not take is a ConfigError, so a
misspelt choice cannot silently run another experiment. The label-driven
partitioners split by the label column; every random draw comes from the
seed given. ``shards`` cuts equal shards and leaves out the remainder (fewer
rows than shards); ``pathological`` assigns classes with flwr-datasets'
``first-deterministic`` mode, so that every class is used whenever there are
at least as many partitions as classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from shoal.core.errors import ConfigError

PARTITIONERS = (
    "dirichlet",
    "exponential",
    "iid",
    "linear",
    "natural_id",
    "pathological",
    "shards",
)
_NUMBERED = frozenset(PARTITIONERS) - {"natural_id"}
_LABELLED = frozenset({"dirichlet", "shards", "pathological"})
_OWN_OPTIONS = {
    "alpha": "dirichlet",
    "min_partition_size": "dirichlet",
    "shards_per_partition": "shards",
    "classes_per_partition": "pathological",
    "partition_by": "natural_id",
}


@dataclass(frozen=True, slots=True)
class PartitionerOptions:
    """The options of a named partitioner, as given (None: not given)."""

    num_partitions: int | None = None
    alpha: float | None = None
    min_partition_size: int | None = None
    shards_per_partition: int | None = None
    classes_per_partition: int | None = None
    partition_by: str | None = None


def check_options(name: str, options: PartitionerOptions) -> None:
    """ConfigError unless ``name`` is known and takes every option given, each with a good value."""
    if name not in PARTITIONERS:
        raise ConfigError(f"unknown partitioner {name!r}: choose one of {', '.join(PARTITIONERS)}")
    for option, owner in _OWN_OPTIONS.items():
        if getattr(options, option) is not None and owner != name:
            raise ConfigError(f"{option} applies to partitioner={owner!r}, not {name!r}")
    if name in _NUMBERED:
        _check_count("num_partitions", options.num_partitions, name=name, required=True)
    elif options.num_partitions is not None:
        raise ConfigError(
            "partitioner='natural_id' makes one partition per id: drop num_partitions"
        )
    if name == "natural_id" and not options.partition_by:
        raise ConfigError("partitioner='natural_id' needs partition_by, the column of client ids")
    if options.alpha is not None and not (math.isfinite(options.alpha) and options.alpha > 0):
        raise ConfigError(f"alpha must be a positive finite number, got {options.alpha}")
    _check_count("min_partition_size", options.min_partition_size, name=name, minimum=0)
    _check_count("shards_per_partition", options.shards_per_partition, name=name)
    _check_count("classes_per_partition", options.classes_per_partition, name=name)


def needed_columns(name: str, *, label: str, options: PartitionerOptions) -> tuple[str, ...]:
    """The columns the named partitioner reads (none for the size-only ones)."""
    if name in _LABELLED:
        return (label,)
    if name == "natural_id":
        assert options.partition_by is not None  # check_options requires it
        return (options.partition_by,)
    return ()


def build_partitioner(
    module: ModuleType, name: str, *, label: str, options: PartitionerOptions, seed: int
) -> Any:
    """A fresh flwr-datasets partitioner for a checked ``name`` and ``options``."""
    count = options.num_partitions
    if name == "iid":
        return module.IidPartitioner(num_partitions=count)
    if name == "linear":
        return module.LinearPartitioner(num_partitions=count)
    if name == "exponential":
        return module.ExponentialPartitioner(num_partitions=count)
    if name == "natural_id":
        return module.NaturalIdPartitioner(partition_by=options.partition_by)
    if name == "dirichlet":
        return module.DirichletPartitioner(
            num_partitions=count,
            partition_by=label,
            alpha=float(0.5 if options.alpha is None else options.alpha),
            min_partition_size=_default(options.min_partition_size, 1),
            seed=seed,
        )
    if name == "shards":
        return module.ShardPartitioner(
            num_partitions=count,
            partition_by=label,
            num_shards_per_partition=_default(options.shards_per_partition, 2),
            seed=seed,
        )
    return module.PathologicalPartitioner(
        num_partitions=count,
        partition_by=label,
        num_classes_per_partition=_default(options.classes_per_partition, 2),
        class_assignment_mode="first-deterministic",
        seed=seed,
    )


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


def _check_count(
    option: str, value: int | None, *, name: str, minimum: int = 1, required: bool = False
) -> None:
    if value is None:
        if required:
            raise ConfigError(f"partitioner={name!r} needs {option}")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{option} must be an integer >= {minimum}, got {value!r}")
