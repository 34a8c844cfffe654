"""Arrays, DataFrames and Hugging Face datasets behind one table: names, numeric checks, rows."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.core.errors import DataError
from shoal.datasets.tables import FEATURES_COLUMN, as_table
from support.tabular import KINDS, in_form, make_columns

# flwr_datasets first: without the extra, "datasets" would find this test folder instead
pytest.importorskip("flwr_datasets")
datasets = pytest.importorskip("datasets")
pd = pytest.importorskip("pandas")


@pytest.mark.parametrize("kind", KINDS)
def test_every_form_names_its_columns_and_rows(kind: str) -> None:
    table = as_table(in_form(kind, *make_columns(num_rows=12)), label="label")
    expected = (FEATURES_COLUMN, "label") if kind == "pair" else ("a", "b", "label", "user")
    assert table.column_names == expected
    assert table.num_rows == 12
    assert table.is_numeric("label")
    if kind != "pair":
        assert not table.is_numeric("user")


@pytest.mark.parametrize("kind", KINDS)
def test_every_form_gathers_rows_in_the_order_asked(kind: str) -> None:
    features, labels, _ = make_columns(num_rows=12)
    table = as_table(in_form(kind, features, labels, _), label="label")
    rows = np.array([11, 0, 5], dtype=np.int64)
    gathered = table.gather(rows, ("label",))
    np.testing.assert_array_equal(gathered["label"], labels[rows])
    empty = table.gather(np.zeros(0, dtype=np.int64), ("label",))["label"]
    assert empty.shape == (0,)
    assert empty.dtype.kind == "i"  # an empty partition keeps integer labels


@pytest.mark.parametrize("kind", KINDS)
def test_arrow_holds_the_asked_columns_for_every_row(kind: str) -> None:
    features, labels, _ = make_columns(num_rows=12)
    arrow = as_table(in_form(kind, features, labels, _), label="label").arrow(["label"])
    assert arrow.column_names == ["label"]
    np.testing.assert_array_equal(arrow.column("label").to_numpy(), labels)


def test_a_pair_keeps_its_feature_array_out_of_the_partitioners_sight() -> None:
    table = as_table((np.zeros((4, 3, 3)), np.arange(4)), label="y")
    assert table.scalar_columns == ("y",)
    with pytest.raises(DataError, match="cannot be named 'features'"):
        as_table((np.zeros((4, 3)), np.arange(4)), label=FEATURES_COLUMN)


@pytest.mark.parametrize(
    ("feature", "values", "numeric"),
    [
        (datasets.Value("float32"), [1.0, 0.0], True),
        (datasets.Value("bool"), [True, False], True),
        (datasets.ClassLabel(names=["no", "yes"]), [1, 0], True),
        (datasets.List(datasets.Value("float64")), [[1.0], [2.0, 3.0]], True),
        (datasets.Array2D(shape=(2, 2), dtype="int32"), [[[1, 2], [3, 4]]] * 2, True),
        (datasets.Value("string"), ["a", "b"], False),
        (datasets.List(datasets.Value("string")), [["a"], ["b"]], False),
    ],
)
def test_hugging_face_types_are_numeric_when_they_hold_numbers(
    feature: object, values: list[object], numeric: bool
) -> None:
    schema = datasets.Features({"x": feature})
    table = as_table(datasets.Dataset.from_dict({"x": values}, features=schema), label="x")
    assert table.is_numeric("x") is numeric


def test_an_image_column_of_a_hugging_face_dataset_gathers_as_arrays() -> None:
    images = np.arange(5 * 2 * 3).reshape(5, 2, 3)
    table = as_table(
        datasets.Dataset.from_dict({"pixels": images.tolist(), "label": [0, 1, 0, 1, 1]}),
        label="label",
    )
    gathered = table.gather(np.array([4, 1]), ("pixels", "label"))
    np.testing.assert_array_equal(gathered["pixels"], images[[4, 1]])


@pytest.mark.parametrize(
    ("series", "numeric"),
    [
        (pd.Series([1, 2], dtype="Int64"), True),
        (pd.Series([True, False]), True),
        (pd.Series(["a", "b"], dtype="category"), False),
        (pd.Series(["a", "b"]), False),
        (pd.Series(pd.to_datetime(["2024-01-01", "2024-01-02"])), False),
    ],
)
def test_dataframe_columns_are_numeric_when_numpy_can_count_them(
    series: object, numeric: bool
) -> None:
    table = as_table(pd.DataFrame({"x": series, "label": [0, 1]}), label="label")
    assert table.is_numeric("x") is numeric


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x": np.float64(3.0), "label": np.arange(2)}, "column 'x' is a scalar"),
        ({"x": np.zeros(3), "label": np.arange(2)}, "one row per example"),
        ("a,b\n1,2", "got str"),
    ],
)
def test_shapeless_data_is_refused(data: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        as_table(data, label="label")


def test_dataframe_column_names_must_be_unique_text() -> None:
    repeated = pd.DataFrame([[1, 2, 0]], columns=["a", "a", "label"])
    with pytest.raises(DataError, match="must be unique"):
        as_table(repeated, label="label")
