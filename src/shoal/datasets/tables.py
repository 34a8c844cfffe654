"""One table interface over numpy arrays, a pandas DataFrame and a Hugging Face Dataset.

A :class:`Table` names its columns, says which of them a model can read as
numbers, hands chosen columns to the partitioners as an Arrow table, and
gathers chosen rows of chosen columns as numpy arrays. Data is never copied
whole: numpy columns stay where they are, and a partition's rows are read
from the user's own object when it is taken.

Accepted data (see :func:`as_table`):

- ``(features, labels)``: two arrays with one row each per example;
- a mapping of column name to array, e.g. ``{"image": x, "label": y, "user": ids}``;
- a ``pandas.DataFrame`` (column names must be text);
- a ``datasets.Dataset``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from shoal.core.errors import DataError
from shoal.datasets.arrays import IndexArray, is_numeric_dtype
from shoal.datasets.extra import import_pyarrow

FEATURES_COLUMN = "features"  # the name of x in a (features, labels) pair


class Table(Protocol):
    """Columns by name, row count, numeric checks, Arrow for partitioners, numpy rows for models."""

    @property
    def column_names(self) -> tuple[str, ...]: ...

    @property
    def num_rows(self) -> int: ...

    @property
    def scalar_columns(self) -> tuple[str, ...]:
        """The columns a partitioner may read: those holding one scalar per row."""
        ...

    def is_numeric(self, name: str) -> bool: ...

    def arrow(self, columns: Sequence[str]) -> Any:
        """A ``pyarrow.Table`` of these columns, every row, in order."""
        ...

    def gather(self, rows: IndexArray, columns: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
        """These columns at these rows, as numpy arrays."""
        ...


def as_table(data: Any, *, label: str) -> Table:
    """The table view of ``data``; DataError naming what is wrong with it."""
    if isinstance(data, tuple):
        if len(data) != 2:
            raise DataError(f"array data is a (features, labels) pair, got {len(data)} arrays")
        if label == FEATURES_COLUMN:
            raise DataError(f"with a (features, labels) pair, the label cannot be named {label!r}")
        return ArrayTable({FEATURES_COLUMN: data[0], label: data[1]})
    if isinstance(data, Mapping):
        return ArrayTable(data)
    if _is_instance(data, "pandas", "DataFrame"):
        return PandasTable(data)
    if _is_instance(data, "datasets", "Dataset"):
        return HuggingFaceTable(data)
    raise DataError(
        "data must be a (features, labels) pair of arrays, a mapping of column name to array, "
        f"a pandas DataFrame or a datasets.Dataset, got {type(data).__name__}"
    )


class ArrayTable:
    """Equal-length numpy arrays by name; multi-dimensional columns (images) are features only."""

    def __init__(self, columns: Mapping[str, npt.ArrayLike]) -> None:
        if not columns:
            raise DataError("array data has no columns")
        self._columns = {str(name): np.asarray(values) for name, values in columns.items()}
        lengths = {name: _length(array, name) for name, array in self._columns.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"columns must have one row per example, got lengths {lengths}")
        self._rows = next(iter(lengths.values()))

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(self._columns)

    @property
    def num_rows(self) -> int:
        return self._rows

    @property
    def scalar_columns(self) -> tuple[str, ...]:
        return tuple(name for name, array in self._columns.items() if array.ndim == 1)

    def is_numeric(self, name: str) -> bool:
        return is_numeric_dtype(self._columns[name].dtype)

    def arrow(self, columns: Sequence[str]) -> Any:
        pa = import_pyarrow()
        return pa.table({name: pa.array(self._columns[name]) for name in columns})

    def gather(self, rows: IndexArray, columns: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
        return {name: self._columns[name][rows] for name in columns}


class PandasTable:
    """A DataFrame's columns; its rows are taken by position (``iloc``), whatever its index."""

    def __init__(self, frame: Any) -> None:
        names = list(frame.columns)
        strange = [name for name in names if not isinstance(name, str)]
        if strange:
            raise DataError(f"DataFrame column names must be text, got {strange[0]!r}")
        if len(set(names)) != len(names):
            raise DataError(f"DataFrame column names must be unique, got {names}")
        self._frame = frame

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(self._frame.columns)

    @property
    def num_rows(self) -> int:
        return len(self._frame)

    @property
    def scalar_columns(self) -> tuple[str, ...]:
        return self.column_names

    def is_numeric(self, name: str) -> bool:
        return str(self._frame[name].dtype.kind) in "biuf"

    def arrow(self, columns: Sequence[str]) -> Any:
        pa = import_pyarrow()
        try:
            return pa.Table.from_pandas(self._frame[list(columns)], preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"cannot convert the DataFrame to Arrow: {exc}") from exc

    def gather(self, rows: IndexArray, columns: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
        gathered = {}
        for name in columns:
            series = self._frame[name].iloc[rows]
            if series.isna().any():
                raise DataError(f"DataFrame column {name!r} has missing values")
            gathered[name] = series.to_numpy()
        return gathered


class HuggingFaceTable:
    """A ``datasets.Dataset``: scalar columns read through Arrow, nested ones through numpy."""

    def __init__(self, dataset: Any) -> None:
        self._dataset = dataset
        self._schema = dataset.features.arrow_schema

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(self._dataset.column_names)

    @property
    def num_rows(self) -> int:
        return int(self._dataset.num_rows)

    @property
    def scalar_columns(self) -> tuple[str, ...]:
        return self.column_names

    def is_numeric(self, name: str) -> bool:
        return _arrow_numeric(self._schema.field(name).type)

    def arrow(self, columns: Sequence[str]) -> Any:
        return self._dataset.select_columns(list(columns)).with_format("arrow")[:]

    def gather(self, rows: IndexArray, columns: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
        taken = self._dataset.select(rows)
        nested = [name for name in columns if _is_nested(self._schema.field(name).type)]
        flat = [name for name in columns if name not in nested]
        gathered: dict[str, npt.NDArray[Any]] = {}
        if flat:
            table = taken.select_columns(flat).with_format("arrow")[:]
            gathered |= {name: table.column(name).to_numpy() for name in flat}
        if nested:
            gathered |= taken.with_format("numpy", columns=nested)[:]
        return gathered


def _arrow_numeric(arrow_type: Any) -> bool:
    """Whether an Arrow type holds numbers: ints, floats, bools, or (nested) lists of them."""
    pa = import_pyarrow()
    if isinstance(arrow_type, pa.ExtensionType):
        return _arrow_numeric(arrow_type.storage_type)
    if _is_nested(arrow_type):
        return _arrow_numeric(arrow_type.value_type)
    types = pa.types
    return bool(
        types.is_integer(arrow_type)
        or types.is_floating(arrow_type)
        or types.is_boolean(arrow_type)
    )


def _is_nested(arrow_type: Any) -> bool:
    pa = import_pyarrow()
    if isinstance(arrow_type, pa.ExtensionType):
        return _is_nested(arrow_type.storage_type)
    types = pa.types
    return bool(
        types.is_list(arrow_type)
        or types.is_large_list(arrow_type)
        or types.is_fixed_size_list(arrow_type)
    )


def _length(array: npt.NDArray[Any], name: str) -> int:
    if array.ndim == 0:
        raise DataError(f"column {name!r} is a scalar, not one value per row")
    return int(array.shape[0])


def _is_instance(data: Any, module: str, name: str) -> bool:
    """isinstance against a class of a module the caller has imported, importing nothing."""
    kind = getattr(sys.modules.get(module), name, None)
    return isinstance(kind, type) and isinstance(data, kind)
