"""One client per CSV or Parquet file: ids from the stems, a clear error naming each bad file."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.core.errors import DataError, MissingExtraError
from shoal.datasets import partition_folder

HEADER = ["x1", "x2", "label"]


def write_csv(path: Path, rows: list[list[object]], *, header: list[str] = HEADER) -> Path:
    lines = [",".join(header)] + [",".join(str(value) for value in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[object]]) -> Path:
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    parquet.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def csv_folder(tmp_path: Path) -> Path:
    write_csv(tmp_path / "bank-b.csv", [[0.5, 1, 1], [1.5, 2, 0], [2.5, 3, 1]])
    write_csv(tmp_path / "bank-a.csv", [[0.0, 0, 0]])
    write_csv(tmp_path / "bank-c.csv", [[9, 8, 2], [7, 6, 1]])
    return tmp_path


def test_each_csv_file_is_one_client_in_stem_order(csv_folder: Path) -> None:
    clients = partition_folder(csv_folder)
    assert clients.ids == ("bank-a", "bank-b", "bank-c")
    assert [len(client) for client in clients] == [1, 3, 2]
    features, labels = clients["bank-b"].to_numpy()
    np.testing.assert_array_equal(features, np.array([[0.5, 1], [1.5, 2], [2.5, 3]], np.float32))
    np.testing.assert_array_equal(labels, [1, 0, 1])
    assert (features.dtype, labels.dtype) == (np.float32, np.int64)
    assert clients[2].id == "bank-c"
    np.testing.assert_array_equal(clients[2].rows, [0, 1])


def test_chosen_features_and_label_by_name(csv_folder: Path) -> None:
    features, labels = partition_folder(csv_folder, label="x2", features=["label"])[1].to_numpy()
    np.testing.assert_array_equal(features[:, 0], [1, 0, 1])
    np.testing.assert_array_equal(labels, [1, 2, 3])


def test_labels_written_as_decimals_are_float32(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", [[1, 2, 0.25], [3, 4, 1.0]])
    _, labels = partition_folder(tmp_path)[0].to_numpy()
    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, [0.25, 1.0])


def test_csv_tolerates_a_bom_spaces_blank_lines_and_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("\ufeff x1 ,x2, label\n1, 2,3\n\n4,5 ,6\n", encoding="utf-8")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "archive").mkdir()
    features, labels = partition_folder(tmp_path)["a"].to_numpy()
    np.testing.assert_array_equal(features, [[1, 2], [4, 5]])
    np.testing.assert_array_equal(labels, [3, 6])


def test_a_parquet_folder_reads_typed_columns(tmp_path: Path) -> None:
    write_parquet(tmp_path / "s2.parquet", {"x1": [1.5, 2.5], "x2": [True, False], "label": [3, 4]})
    write_parquet(tmp_path / "s1.parquet", {"label": [7], "x1": [0.0], "x2": [True]})
    clients = partition_folder(tmp_path, features=["x2", "x1"])
    assert clients.ids == ("s1", "s2")
    features, labels = clients["s2"].to_numpy()
    np.testing.assert_array_equal(features, [[1, 1.5], [0, 2.5]])
    np.testing.assert_array_equal(labels, [3, 4])
    assert labels.dtype == np.int64


def test_parquet_without_the_extra_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_parquet(tmp_path / "s1.parquet", {"x1": [1.0], "label": [0]})
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'shoal\[datasets\]'"):
        partition_folder(tmp_path)


def test_csv_needs_no_pyarrow(csv_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("pyarrow", "pyarrow.parquet", "pandas", "datasets", "flwr_datasets"):
        monkeypatch.setitem(sys.modules, module, None)
    assert len(partition_folder(csv_folder)[1].to_numpy()[1]) == 3


BAD_CSV = [
    ("", "file bad.csv is empty"),
    ("x1,x2,label\n", "file bad.csv has a header but no rows"),
    ("x1,x2,label\n\n\n", "file bad.csv has a header but no rows"),
    ("x1,x2,label\n1,2,0\n1,abc,0\n", "file bad.csv line 3, column 'x2': 'abc' is not a number"),
    ("x1,x2,label\n1,,0\n", "file bad.csv line 2, column 'x2': an empty value is not a number"),
    ("x1,x2,label\n1,2,0\n1,2\n", "file bad.csv line 3: 2 values, the header has 3"),
    ("x1,x2,label\n1,nan,0\n", "file bad.csv: column 'x2' holds NaN or infinite values"),
    ("x1,x2,label\n1,2,inf\n", "file bad.csv: column 'label' holds NaN or infinite values"),
    ("x1,x2,label\n1,2,cat\n", "file bad.csv line 2, column 'label': 'cat' is not a number"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CSV)
def test_a_bad_csv_file_is_named(csv_folder: Path, text: str, message: str) -> None:
    (csv_folder / "bad.csv").write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"^{message}"):
        partition_folder(csv_folder)["bad"].to_numpy()


BAD_FOLDERS = [
    ({}, "holds no client files"),
    ({".hidden.csv": "x1,label\n1,0\n"}, "holds no client files"),
    ({"a.csv": "x1,x2,label\n1,2,0\n", "b.parquet": None}, "all .csv or all .parquet, found a.csv"),
    ({"a.csv": "x1,x2,label\n1,2,0\n", "notes.txt": "hi"}, "file notes.txt is neither"),
    ({"a.csv": "x1,x2,label\n1,2,0\n", "b.csv": "x1,label\n1,0\n"},
     "file b.csv has other columns than a.csv: missing x2"),
    ({"a.csv": "x1,x2,label\n1,2,0\n", "b.csv": "x1,x2,x3,label\n1,2,3,0\n"},
     "file b.csv has other columns than a.csv: extra x3"),
    ({"a.csv": "x1,x2,y\n1,2,0\n"},
     "file a.csv has no label column 'label' \\(columns: x1, x2, y\\)"),
    ({"a.csv": "x1,x1,label\n1,2,0\n"}, "file a.csv repeats column 'x1'"),
    ({"a.csv": "x1,,label\n1,2,0\n"}, "file a.csv has a column without a name"),
    ({"a.csv": "label\n1\n"}, "file a.csv has no feature columns besides the label"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "message"), BAD_FOLDERS)
def test_a_bad_folder_is_refused(
    tmp_path: Path, files: dict[str, str | None], message: str
) -> None:
    for name, text in files.items():
        if text is None:
            write_parquet(tmp_path / name, {"x1": [1.0], "label": [0]})
        else:
            (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        partition_folder(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("x1,label\n1,0\n".encode("utf-16"), "file bad.csv is not UTF-8 text"),
        (b'x1,label\n1,"0\n', "file bad.csv is not valid CSV"),
    ],
)
def test_a_file_that_is_not_utf8_csv_is_named(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "bad.csv").write_bytes(content)
    with pytest.raises(DataError, match=message):
        partition_folder(tmp_path)["bad"].to_numpy()


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        partition_folder(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (["x1", "x9"], "file bank-a.csv has no feature column 'x9'"),
        (["x1", "label"], "column 'label' is the label; it cannot also be a feature"),
        (["x1", "x1"], "features name a column twice"),
        ([], "no feature columns besides the label"),
    ],
)
def test_bad_feature_choices_are_refused(
    csv_folder: Path, features: list[str], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        partition_folder(csv_folder, features=features)


def test_bad_parquet_files_are_named(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", {"x1": [1.0], "label": [0]})
    pa = pytest.importorskip("pyarrow")
    write_parquet(tmp_path / "b.parquet", {"x1": pa.array([], "double"), "label": []})
    with pytest.raises(DataError, match=r"file b\.parquet has no rows"):
        partition_folder(tmp_path)
    write_parquet(tmp_path / "b.parquet", {"x1": ["high"], "label": [1]})
    with pytest.raises(DataError, match=r"file b\.parquet: column 'x1' is string, not numeric"):
        partition_folder(tmp_path)
    write_parquet(tmp_path / "b.parquet", {"x1": [None, 2.0], "label": [1, 0]})
    with pytest.raises(DataError, match=r"file b\.parquet: column 'x1' has missing values"):
        partition_folder(tmp_path)["b"].to_numpy()
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"file b\.parquet is not a readable Parquet file"):
        partition_folder(tmp_path)


@settings(max_examples=30, deadline=None)
@given(
    matrix=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
        elements=st.floats(-1e9, 1e9),
    ),
    labels=st.lists(st.integers(-5, 5), min_size=8, max_size=8),
)
def test_csv_values_round_trip(matrix: npt.NDArray[np.float64], labels: list[int]) -> None:
    rows: list[list[object]] = [
        [*map(repr, row.tolist()), labels[index]] for index, row in enumerate(matrix)
    ]
    header = [f"f{column}" for column in range(matrix.shape[1])] + ["label"]
    with tempfile.TemporaryDirectory() as folder:
        write_csv(Path(folder) / "only.csv", rows, header=header)
        features, got = partition_folder(folder)[0].to_numpy()
    np.testing.assert_array_equal(features, matrix.astype(np.float32))
    np.testing.assert_array_equal(got, labels[: matrix.shape[0]])
