"""Each named partitioner takes only its own options and builds its flwr-datasets class."""

from __future__ import annotations

import dataclasses

import pytest

from shoal.core.errors import ConfigError
from shoal.datasets.partitioners import (
    PARTITIONERS,
    PartitionerOptions,
    build_partitioner,
    check_options,
    needed_columns,
)

GOOD: dict[str, PartitionerOptions] = {
    "iid": PartitionerOptions(num_partitions=3),
    "linear": PartitionerOptions(num_partitions=3),
    "exponential": PartitionerOptions(num_partitions=3),
    "dirichlet": PartitionerOptions(num_partitions=3, alpha=0.1, min_partition_size=0),
    "shards": PartitionerOptions(num_partitions=3, shards_per_partition=4),
    "pathological": PartitionerOptions(num_partitions=3, classes_per_partition=1),
    "natural_id": PartitionerOptions(partition_by="user"),
}
SAMPLE_VALUES = {
    "num_partitions": 3,
    "alpha": 0.5,
    "min_partition_size": 2,
    "shards_per_partition": 2,
    "classes_per_partition": 2,
    "partition_by": "user",
}
CLASSES = {
    "iid": "IidPartitioner",
    "linear": "LinearPartitioner",
    "exponential": "ExponentialPartitioner",
    "dirichlet": "DirichletPartitioner",
    "shards": "ShardPartitioner",
    "pathological": "PathologicalPartitioner",
    "natural_id": "NaturalIdPartitioner",
}


def test_the_names_are_sorted_and_all_tested() -> None:
    assert list(PARTITIONERS) == sorted(PARTITIONERS)
    assert set(GOOD) == set(PARTITIONERS) == set(CLASSES)


@pytest.mark.parametrize("name", PARTITIONERS)
def test_each_name_takes_its_own_options(name: str) -> None:
    check_options(name, GOOD[name])


FOREIGN = [
    (name, option)
    for name in PARTITIONERS
    for option in sorted(SAMPLE_VALUES)
    if getattr(GOOD[name], option) is None
]


@pytest.mark.parametrize(("name", "option"), FOREIGN)
def test_every_option_is_refused_where_it_does_not_apply(name: str, option: str) -> None:
    """The whole table: a name given one option more than it takes is a ConfigError."""
    with pytest.raises(ConfigError, match=option):
        check_options(name, dataclasses.replace(GOOD[name], **{option: SAMPLE_VALUES[option]}))


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="choose one of dirichlet, exponential, iid"):
        check_options("IID", PartitionerOptions(num_partitions=2))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (PartitionerOptions(), "needs num_partitions"),
        (PartitionerOptions(num_partitions=0), "num_partitions must be an integer >= 1, got 0"),
        (PartitionerOptions(num_partitions=2.0), "num_partitions must be an integer"),  # type: ignore[arg-type]
        (PartitionerOptions(num_partitions=2, alpha=-1.0), "alpha must be a positive"),
        (PartitionerOptions(num_partitions=2, alpha=float("inf")), "alpha must be a positive"),
        (PartitionerOptions(num_partitions=2, min_partition_size=-1), "min_partition_size"),
    ],
)
def test_bad_values_are_refused(options: PartitionerOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_options("dirichlet", options)


def test_natural_id_needs_its_column() -> None:
    with pytest.raises(ConfigError, match="needs partition_by"):
        check_options("natural_id", PartitionerOptions(partition_by=""))


@pytest.mark.parametrize(
    ("name", "columns"),
    [
        ("iid", ()),
        ("linear", ()),
        ("exponential", ()),
        ("dirichlet", ("y",)),
        ("shards", ("y",)),
        ("pathological", ("y",)),
        ("natural_id", ("user",)),
    ],
)
def test_only_the_columns_a_partitioner_reads_are_handed_over(
    name: str, columns: tuple[str, ...]
) -> None:
    assert needed_columns(name, label="y", options=GOOD[name]) == columns


@pytest.mark.parametrize("name", PARTITIONERS)
def test_each_name_builds_its_class(name: str) -> None:
    module = pytest.importorskip("flwr_datasets.partitioner")
    built = build_partitioner(module, name, label="y", options=GOOD[name], seed=5)
    assert type(built).__name__ == CLASSES[name]
    assert not built.is_dataset_assigned()
    if name in ("dirichlet", "shards", "pathological"):
        assert built._seed == 5
        assert built._partition_by == "y"
