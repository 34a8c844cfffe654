"""Columns become model arrays by one rule: shapes kept or joined, float32 features, typed y."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.core.errors import DataError
from shoal.datasets.arrays import feature_array, label_array, model_arrays


def test_one_scalar_feature_column_becomes_a_column_vector() -> None:
    features, labels = model_arrays(
        {"a": np.arange(4), "y": np.arange(4)}, label="y", features=("a",), where="data"
    )
    assert features.shape == (4, 1)
    assert features.dtype == np.float32
    assert labels.dtype == np.int64


def test_one_image_column_keeps_its_shape() -> None:
    images = np.zeros((3, 5, 5), dtype=np.uint8)
    assert feature_array({"image": images}, features=("image",), where="data").shape == (3, 5, 5)


def test_several_columns_are_flattened_side_by_side() -> None:
    columns = {
        "a": np.arange(3),
        "pixels": np.ones((3, 2, 2)),
        "flag": np.array([True, False, True]),
    }
    joined = feature_array(columns, features=("a", "pixels", "flag"), where="data")
    assert joined.shape == (3, 6)
    np.testing.assert_array_equal(joined[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(joined[:, 5], [1, 0, 1])


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        (np.array([0, 3]), np.int64),
        (np.array([0, 3], dtype=np.uint8), np.int64),
        (np.array([True, False]), np.int64),
        (np.array([0.5, 1.5]), np.float32),
    ],
)
def test_labels_are_int64_or_float32(values: npt.NDArray[np.generic], dtype: type) -> None:
    assert label_array(values, column="y", where="data").dtype == dtype


def test_zero_rows_give_empty_arrays() -> None:
    features, labels = model_arrays(
        {"a": np.zeros((0, 3)), "y": np.zeros(0, dtype=np.int64)},
        label="y",
        features=("a",),
        where="data",
    )
    assert features.shape == (0, 3)
    assert labels.shape == (0,)


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (np.array(["x", "y"]), "column 'a' is <U1, not numeric"),
        (np.array([1.0, np.nan]), "column 'a' holds NaN or infinite values"),
        (np.array([1.0, np.inf]), "column 'a' holds NaN or infinite values"),
        (np.array(3.0), "column 'a' is a scalar"),
        (np.array([[1, 2], [3]], dtype=object), "column 'a' is not a regular numeric array"),
    ],
)
def test_bad_feature_columns_are_named(column: npt.NDArray[np.generic], message: str) -> None:
    with pytest.raises(DataError, match=rf"^file x\.csv: {message}"):
        feature_array({"a": column}, features=("a",), where="file x.csv")


def test_no_feature_columns_is_refused() -> None:
    with pytest.raises(DataError, match="no feature columns"):
        feature_array({"a": np.arange(2)}, features=(), where="data")


def test_labels_must_be_scalars() -> None:
    with pytest.raises(DataError, match="label column 'y' must hold scalars"):
        label_array(np.zeros((2, 2)), column="y", where="data")


@given(
    matrix=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, max_side=6),
        elements=st.floats(-1e6, 1e6),
    )
)
def test_one_matrix_column_round_trips_as_float32(matrix: npt.NDArray[np.float64]) -> None:
    labels = np.arange(matrix.shape[0])
    features, got = model_arrays(
        {"x": matrix, "y": labels}, label="y", features=("x",), where="data"
    )
    np.testing.assert_array_equal(features, matrix.astype(np.float32))
    np.testing.assert_array_equal(got, labels)
