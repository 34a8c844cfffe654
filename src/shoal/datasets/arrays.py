"""Model-ready arrays from named columns: float32 features and int64 or float32 labels.

One rule for every source (arrays, DataFrames, Hugging Face datasets, files):
a single feature column keeps its shape (a scalar column becomes ``(n, 1)``,
an image column stays ``(n, 28, 28)``); several feature columns are
flattened and joined side by side into ``(n, d)``. Integer and boolean
labels become int64, floating-point labels float32. NaN and infinities are
refused: a model would only turn them into a NaN update, which the
coordinator rejects much later. ``where`` names the source in error
messages ("data", "file a.csv").

>>> x, y = model_arrays({"a": np.arange(3), "b": np.ones(3), "y": np.array([0, 1, 1])},
...                     label="y", features=("a", "b"), where="data")
>>> x.shape, x.dtype, y.dtype
((3, 2), dtype('float32'), dtype('int64'))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from shoal.core.errors import DataError

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64] | npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int64]

NUMERIC_KINDS = frozenset("biuf")  # numpy dtype kinds: bool, int, uint, float


def is_numeric_dtype(dtype: np.dtype[np.generic]) -> bool:
    """Whether numpy can hand this dtype to a model as numbers (bool, int, uint or float)."""
    return dtype.kind in NUMERIC_KINDS


def model_arrays(
    columns: Mapping[str, npt.ArrayLike],
    *,
    label: str,
    features: Sequence[str],
    where: str,
) -> tuple[FloatArray, LabelArray]:
    """``(features, labels)`` for a model from the named columns of one set of rows."""
    labels = label_array(columns[label], column=label, where=where)
    return feature_array(columns, features=features, where=where), labels


def label_array(values: npt.ArrayLike, *, column: str, where: str) -> LabelArray:
    """A 1-D label array: int64 from integers or booleans, float32 from floats."""
    array = _numeric(values, column=column, where=where)
    if array.ndim != 1:
        raise DataError(
            f"{where}: label column {column!r} must hold scalars, got shape {array.shape}"
        )
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    return array.astype(np.int64, copy=False)


def feature_array(
    columns: Mapping[str, npt.ArrayLike], *, features: Sequence[str], where: str
) -> FloatArray:
    """float32 features: one column keeps its shape (scalars as (n, 1)), several join as (n, d)."""
    if not features:
        raise DataError(f"{where}: no feature columns")
    arrays = [_numeric(columns[name], column=name, where=where) for name in features]
    if len(arrays) == 1:
        only = arrays[0]
        shaped = only.reshape(-1, 1) if only.ndim == 1 else only
        return shaped.astype(np.float32, copy=False)
    rows = arrays[0].shape[0]
    flat = [array.reshape(rows, -1) for array in arrays]
    return np.concatenate(flat, axis=1).astype(np.float32, copy=False)


def _numeric(values: npt.ArrayLike, *, column: str, where: str) -> npt.NDArray[np.generic]:
    """``values`` as a numeric array, or a DataError naming the column."""
    try:
        array = np.asarray(values)
        if array.dtype == object:
            # ragged rows (lists of different lengths) or mixed objects
            array = np.stack([np.asarray(item) for item in array]) if array.size else array
    except (ValueError, TypeError) as exc:
        raise DataError(
            f"{where}: column {column!r} is not a regular numeric array: {exc}"
        ) from exc
    if not is_numeric_dtype(array.dtype):
        raise DataError(f"{where}: column {column!r} is {array.dtype}, not numeric")
    if array.ndim == 0:
        raise DataError(f"{where}: column {column!r} is a scalar, not one value per row")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{where}: column {column!r} holds NaN or infinite values")
    return array
