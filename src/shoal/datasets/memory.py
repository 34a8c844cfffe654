"""Partition data held in memory with flwr-datasets' partitioners, the same way in every process.

:func:`partition` is what a client app calls: ``partition(data, ...)[index]``
in each client process. Given the same data, options and ``seed``, every
process gets the same partitions. The partitioners see a narrow Arrow copy
of the columns they read plus each row's position; a partition's examples
are then read from the caller's own object (arrays, DataFrame or Dataset)
by position, when the partition is turned into numpy.

Per process, the last few partitionings by name are cached, keyed by the
identity of the data object (its arrays, for a pair or a mapping) and the
options: a client app that keeps its data in a module-level variable pays
for the partitioning once per process. The cache holds a reference to the
data; do not modify the arrays in place between calls (or pass
``cache=False``). A partitioner instance is used once and never cached.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from shoal.core.errors import ConfigError, DataError
from shoal.datasets.arrays import FloatArray, IndexArray, LabelArray, model_arrays
from shoal.datasets.extra import import_flwr_datasets, import_pyarrow
from shoal.datasets.partitioners import (
    PartitionerOptions,
    build_partitioner,
    check_options,
    needed_columns,
)
from shoal.datasets.partitions import Partition, Partitions, RowsLoader
from shoal.datasets.tables import Table, as_table

ROW_COLUMN = "__shoal_row__"  # each row's position in the caller's data
CACHE_SIZE = 4
_FLWR_ERRORS = (ValueError, TypeError, KeyError, IndexError)


def partition(
    data: Any,
    *,
    partitioner: str | Any = "iid",
    num_partitions: int | None = None,
    label: str = "label",
    features: Sequence[str] | None = None,
    partition_by: str | None = None,
    alpha: float | None = None,
    min_partition_size: int | None = None,
    shards_per_partition: int | None = None,
    classes_per_partition: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    cache: bool = True,
) -> Partitions:
    """Cut ``data`` into client partitions with a flwr-datasets partitioner.

    ``data`` is a ``(features, labels)`` pair of arrays, a mapping of column
    name to array, a pandas DataFrame or a ``datasets.Dataset``.
    ``partitioner`` is a name (see :data:`PARTITIONERS` and the options each
    takes in :mod:`shoal.datasets.partitioners`) or a flwr-datasets
    ``Partitioner`` you built, not yet given a dataset (it sees the data's
    one-value-per-row columns, in Arrow format). ``label`` names the label
    column; ``features`` the feature columns (default: all the others but
    ``partition_by``; name them when an instance partitions by a text id).
    ``shuffle`` permutes the rows first, as flwr-datasets'
    ``FederatedDataset`` does (the size-based partitioners cut contiguous
    ranges). ``seed`` drives the shuffle and the partitioner's own draws.

    >>> parts = partition((x, y), partitioner="dirichlet", num_partitions=8)  # doctest: +SKIP
    >>> x_local, y_local = parts[3].to_numpy()  # doctest: +SKIP
    """
    module, datasets_module = import_flwr_datasets()
    options = PartitionerOptions(
        num_partitions=num_partitions,
        alpha=alpha,
        min_partition_size=min_partition_size,
        shards_per_partition=shards_per_partition,
        classes_per_partition=classes_per_partition,
        partition_by=partition_by,
    )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    named = isinstance(partitioner, str)
    if named:
        check_options(partitioner, options)
    else:
        _check_instance(module, partitioner, options)
    build = functools.partial(
        _partition,
        data,
        modules=(module, datasets_module),
        partitioner=partitioner,
        label=label,
        features=None if features is None else tuple(features),
        options=options,
        seed=seed,
        shuffle=shuffle,
    )
    if not (named and cache):
        return build()
    settings = (partitioner, label, build.keywords["features"], options, seed, shuffle)
    return _CACHE.get_or_build(data, settings, build)


def _partition(
    data: Any,
    *,
    modules: tuple[Any, Any],
    partitioner: str | Any,
    label: str,
    features: tuple[str, ...] | None,
    options: PartitionerOptions,
    seed: int,
    shuffle: bool,
) -> Partitions:
    module, datasets_module = modules
    table = as_table(data, label=label)
    feature_columns = _check_columns(table, label=label, features=features, options=options)
    shuffle_stream, partitioner_stream = np.random.SeedSequence(seed).spawn(2)
    _check_row_count(table, options)
    if isinstance(partitioner, str):
        columns = needed_columns(partitioner, label=label, options=options)
        partitioner_seed = int(partitioner_stream.generate_state(1)[0])
        instance = build_partitioner(
            module, partitioner, label=label, options=options, seed=partitioner_seed
        )
    else:
        columns, instance = table.scalar_columns, partitioner
    permutation = np.random.default_rng(shuffle_stream).permutation(table.num_rows)
    instance.dataset = _index_dataset(
        datasets_module, table, columns, permutation if shuffle else None
    )
    with _flwr_errors():
        count = int(instance.num_partitions)  # draws every partition's rows now
        ids = _partition_ids(module, instance, count)
    loader = functools.partial(_load_rows, table, label=label, features=feature_columns)
    return Partitions(ids=ids, load=functools.partial(_take, instance, ids=ids, loader=loader))


def _check_instance(module: Any, partitioner: Any, options: PartitionerOptions) -> None:
    if not isinstance(partitioner, module.Partitioner):
        raise ConfigError(
            "partitioner must be a name or a flwr_datasets.partitioner.Partitioner, "
            f"got {type(partitioner).__name__}"
        )
    if options != PartitionerOptions():
        raise ConfigError("a partitioner instance carries its own options: pass none beside it")
    if partitioner.is_dataset_assigned():
        raise ConfigError("this partitioner already holds a dataset: pass a new instance")


def _check_columns(
    table: Table, *, label: str, features: Sequence[str] | None, options: PartitionerOptions
) -> tuple[str, ...]:
    """The feature columns, after checking that every named column exists and is numeric."""
    names = table.column_names
    if ROW_COLUMN in names:
        raise DataError(f"the data has a column named {ROW_COLUMN!r}, which Shoal reserves")
    if label not in names:
        raise DataError(f"the data has no label column {label!r} (columns: {', '.join(names)})")
    if options.partition_by is not None and options.partition_by not in names:
        raise DataError(f"the data has no column {options.partition_by!r} to partition by")
    excluded = {label, options.partition_by}
    chosen = (
        tuple(name for name in names if name not in excluded)
        if features is None
        else tuple(features)
    )
    if not chosen:
        raise DataError("the data has no feature columns besides the label")
    if len(set(chosen)) != len(chosen):
        raise DataError(f"features name a column twice: {', '.join(chosen)}")
    for name in chosen:
        if name not in names:
            raise DataError(f"the data has no feature column {name!r}")
        if name == label:
            raise DataError(f"column {label!r} is the label; it cannot also be a feature")
    for name in (label, *chosen):
        if not table.is_numeric(name):
            raise DataError(
                f"column {name!r} is not numeric: encode it as numbers or leave it out of features"
            )
    return chosen


def _check_row_count(table: Table, options: PartitionerOptions) -> None:
    if table.num_rows == 0:
        raise DataError("the data has no rows")
    wanted = options.num_partitions
    if wanted is not None and wanted > table.num_rows:
        raise DataError(f"{table.num_rows} rows cannot make {wanted} non-empty partitions")


def _index_dataset(
    datasets_module: Any, table: Table, columns: Sequence[str], permutation: IndexArray | None
) -> Any:
    """What the partitioner sees: ``columns`` and each row's position, in Arrow format."""
    from datasets.table import InMemoryTable

    pa = import_pyarrow()
    positions = pa.array(np.arange(table.num_rows, dtype=np.int64))
    if columns:
        arrow = table.arrow(columns).append_column(ROW_COLUMN, positions)
    else:
        arrow = pa.table({ROW_COLUMN: positions})
    dataset = datasets_module.Dataset(InMemoryTable(arrow))
    if permutation is not None:
        dataset = dataset.select(permutation)
    # Arrow format: flwr-datasets reads whole columns with np.array(dataset[column]),
    # which is fast on Arrow arrays and very slow on the default format's row objects.
    return dataset.with_format("arrow")


def _partition_ids(module: Any, instance: Any, count: int) -> list[str]:
    if isinstance(instance, module.NaturalIdPartitioner):
        names = instance.partition_id_to_natural_id
        return [str(names[index]) for index in range(count)]
    return [str(index) for index in range(count)]


def _take(instance: Any, index: int, *, ids: Sequence[str], loader: RowsLoader) -> Partition:
    with _flwr_errors():
        part = instance.load_partition(index)
    rows = part.with_format("arrow")[ROW_COLUMN].to_numpy().astype(np.int64, copy=False)
    return Partition(index=index, id=ids[index], rows=rows, loader=loader)


def _load_rows(
    table: Table, rows: IndexArray, *, label: str, features: tuple[str, ...]
) -> tuple[FloatArray, LabelArray]:
    columns = table.gather(rows, (*features, label))
    return model_arrays(columns, label=label, features=features, where="data")


@contextmanager
def _flwr_errors() -> Iterator[None]:
    """flwr-datasets' errors as DataError; its retry notes and a dependency's deprecation hushed."""
    with warnings.catch_warnings():
        # DirichletPartitioner warns on each failed draw, then raises after ten
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        # datasets' sort passes pyarrow an option that pyarrow 25 deprecated
        warnings.filterwarnings(
            "ignore", message="Specifying null_placement", category=FutureWarning
        )
        try:
            yield
        except _FLWR_ERRORS as exc:
            raise DataError(f"flwr-datasets cannot partition the data: {exc}") from exc


class _PartitionsCache:
    """The last few partitionings, keyed by the data objects' identity and the settings."""

    def __init__(self, *, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[Hashable, tuple[tuple[object, ...], Partitions]] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(
        self, data: Any, settings: Hashable, build: Callable[[], Partitions]
    ) -> Partitions:
        names, objects = _identity(data)
        key = (names, tuple(id(item) for item in objects), settings)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][1]
        built = build()
        with self._lock:
            # the entry holds the objects, so their ids cannot be reused while it lives
            self._entries[key] = (objects, built)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return built

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _identity(data: Any) -> tuple[tuple[str, ...], tuple[object, ...]]:
    """The names and objects that identify the data: a pair's or mapping's arrays, else itself."""
    if isinstance(data, tuple):
        return (), tuple(data)
    if isinstance(data, Mapping):
        return tuple(str(name) for name in data), tuple(data.values())
    return (), (data,)


_CACHE = _PartitionsCache(size=CACHE_SIZE)
