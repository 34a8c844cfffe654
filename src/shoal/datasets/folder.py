"""A natural partition from files: a folder with one CSV or Parquet file per client.

Each file is one client; its id is the file's stem, and clients are ordered
by id, so ``partition_folder(path)[3]`` and ``partition_folder(path)["bank-04"]``
both work. Building the partitions reads only each file's header (CSV) or
footer (Parquet) to check that every file has the same columns, the label
column and at least one row; a client's values are read when its partition
is taken, so a client process reads its own file alone.

CSV files need nothing beyond the core install (the standard ``csv`` module
and numpy): a header row, then one row per example, every used value a
number (labels written as integers load as int64, others as float32).
Parquet files need ``pyarrow`` from ``shoal[datasets]``. Hidden files
(``.DS_Store``) are ignored; any other file is a DataError.

>>> clients = partition_folder("silos/", label="default")  # doctest: +SKIP
>>> x, y = clients["bank-03"].to_numpy()  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from shoal.core.errors import DataError
from shoal.datasets.arrays import FloatArray, IndexArray, LabelArray, model_arrays
from shoal.datasets.extra import import_parquet, import_pyarrow
from shoal.datasets.partitions import Partition, Partitions

CSV_SUFFIX = ".csv"
PARQUET_SUFFIX = ".parquet"


def partition_folder(
    folder: str | os.PathLike[str],
    *,
    label: str = "label",
    features: Sequence[str] | None = None,
) -> Partitions:
    """One partition per file of ``folder``, ordered and named by the files' stems.

    ``label`` names the label column; ``features`` the feature columns
    (default: every other column, in the first file's order).
    """
    files = _client_files(Path(folder))
    reader: ClientFileReader = (
        CsvReader() if files[0].suffix.lower() == CSV_SUFFIX else ParquetReader()
    )
    columns = {path: reader.columns(path) for path in files}
    reference = columns[files[0]]
    for path in files[1:]:
        _check_same_columns(path, columns[path], first=files[0], reference=reference)
    chosen = _feature_columns(files[0], reference, label=label, features=features)
    for path in files:
        reader.check_numeric(path, (*chosen, label))
    load = functools.partial(_load, files, reader=reader, label=label, features=chosen)
    return Partitions(ids=[path.stem for path in files], load=load)


class ClientFileReader(Protocol):
    """Reads one client file's column names (checking it has rows) and its values."""

    def columns(self, path: Path) -> tuple[str, ...]: ...

    def check_numeric(self, path: Path, columns: Sequence[str]) -> None: ...

    def read(
        self, path: Path, columns: Sequence[str], *, label: str
    ) -> dict[str, npt.NDArray[Any]]: ...


class CsvReader:
    """CSV with a header row, read with the standard library."""

    def columns(self, path: Path) -> tuple[str, ...]:
        with _csv_rows(path) as rows:
            header = next(rows, None)
            if header is None:
                raise DataError(f"file {path.name} is empty")
            if not any(row for row in rows):
                raise DataError(f"file {path.name} has a header but no rows")
        return _checked_names(path, [name.strip() for name in header])

    def check_numeric(self, path: Path, columns: Sequence[str]) -> None:
        """CSV has no types: values are checked when the file is read."""

    def read(
        self, path: Path, columns: Sequence[str], *, label: str
    ) -> dict[str, npt.NDArray[Any]]:
        with _csv_rows(path) as rows:
            header = [name.strip() for name in next(rows)]
            positions = [header.index(name) for name in columns]
            values: list[list[str]] = [[] for _ in columns]
            lines: list[int] = []
            for row in rows:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"file {path.name} line {rows.line_num}: {len(row)} values, "
                        f"the header has {len(header)}"
                    )
                lines.append(rows.line_num)
                for column_values, position in zip(values, positions, strict=True):
                    column_values.append(row[position])
        return {
            name: _parse_numbers(path, name, texts, lines, integers=name == label)
            for name, texts in zip(columns, values, strict=True)
        }


class ParquetReader:
    """Parquet through pyarrow (the ``datasets`` extra): typed columns, read by name."""

    def columns(self, path: Path) -> tuple[str, ...]:
        parquet_file = self._open(path)
        if parquet_file.metadata.num_rows == 0:
            raise DataError(f"file {path.name} has no rows")
        return _checked_names(path, list(parquet_file.schema_arrow.names))

    def check_numeric(self, path: Path, columns: Sequence[str]) -> None:
        types = import_pyarrow().types
        schema = self._open(path).schema_arrow
        for name in columns:
            kind = schema.field(name).type
            if not (types.is_integer(kind) or types.is_floating(kind) or types.is_boolean(kind)):
                raise DataError(f"file {path.name}: column {name!r} is {kind}, not numeric")

    def read(
        self, path: Path, columns: Sequence[str], *, label: str
    ) -> dict[str, npt.NDArray[Any]]:
        parquet = import_parquet()
        table = parquet.read_table(path, columns=list(columns))
        arrays = {}
        for name in columns:
            column = table.column(name)
            if column.null_count:
                raise DataError(f"file {path.name}: column {name!r} has missing values")
            arrays[name] = column.to_numpy()
        return arrays

    def _open(self, path: Path) -> Any:
        parquet = import_parquet()
        pa = import_pyarrow()
        try:
            return parquet.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"file {path.name} is not a readable Parquet file: {exc}") from exc


@contextmanager
def _csv_rows(path: Path) -> Iterator[Any]:
    """A ``csv.reader`` over a UTF-8 file (a BOM allowed); decoding and CSV errors name the file."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            yield csv.reader(handle, strict=True)
    except UnicodeDecodeError as exc:
        raise DataError(f"file {path.name} is not UTF-8 text: {exc.reason}") from exc
    except csv.Error as exc:
        raise DataError(f"file {path.name} is not valid CSV: {exc}") from exc


def _client_files(folder: Path) -> list[Path]:
    """The folder's client files, sorted by stem; DataError unless all are .csv or all .parquet."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    files = sorted(
        (entry for entry in folder.iterdir() if entry.is_file() and not entry.name.startswith(".")),
        key=lambda entry: entry.stem,
    )
    if not files:
        raise DataError(f"folder {folder.name} holds no client files (.csv or .parquet)")
    for path in files:
        if path.suffix.lower() not in (CSV_SUFFIX, PARQUET_SUFFIX):
            raise DataError(f"file {path.name} is neither .csv nor .parquet")
    suffixes = {path.suffix.lower(): path for path in files}
    if len(suffixes) > 1:
        csv_file, parquet_file = suffixes[CSV_SUFFIX], suffixes[PARQUET_SUFFIX]
        raise DataError(
            f"client files must be all .csv or all .parquet, found {csv_file.name} "
            f"and {parquet_file.name}"
        )
    return files


def _checked_names(path: Path, names: list[str]) -> tuple[str, ...]:
    if any(not name for name in names):
        raise DataError(f"file {path.name} has a column without a name")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"file {path.name} repeats column {repeated[0]!r}")
    return tuple(names)


def _check_same_columns(
    path: Path, columns: tuple[str, ...], *, first: Path, reference: tuple[str, ...]
) -> None:
    missing = [name for name in reference if name not in columns]
    extra = [name for name in columns if name not in reference]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"extra {', '.join(extra)}"] if extra else []
        )
        raise DataError(f"file {path.name} has other columns than {first.name}: {'; '.join(parts)}")


def _feature_columns(
    path: Path, columns: tuple[str, ...], *, label: str, features: Sequence[str] | None
) -> tuple[str, ...]:
    if label not in columns:
        raise DataError(
            f"file {path.name} has no label column {label!r} (columns: {', '.join(columns)})"
        )
    chosen = (
        tuple(name for name in columns if name != label) if features is None else tuple(features)
    )
    if not chosen:
        raise DataError(f"file {path.name} has no feature columns besides the label {label!r}")
    for name in chosen:
        if name == label:
            raise DataError(f"column {label!r} is the label; it cannot also be a feature")
        if name not in columns:
            raise DataError(f"file {path.name} has no feature column {name!r}")
    if len(set(chosen)) != len(chosen):
        raise DataError(f"features name a column twice: {', '.join(chosen)}")
    return chosen


def _parse_numbers(
    path: Path, column: str, texts: list[str], lines: list[int], *, integers: bool
) -> npt.NDArray[Any]:
    """The texts as int64 (labels written as integers) or float64; else DataError at the culprit."""
    raw = np.asarray(texts, dtype=str)
    if integers:
        try:
            return raw.astype(np.int64)
        except ValueError:
            pass  # not all integers: read as floats
    try:
        return raw.astype(np.float64)
    except ValueError:
        for text, line in zip(texts, lines, strict=True):
            try:
                float(text)
            except ValueError:
                shown = repr(text) if text.strip() else "an empty value"
                raise DataError(
                    f"file {path.name} line {line}, column {column!r}: {shown} is not a number"
                ) from None
        raise DataError(
            f"file {path.name}: column {column!r} holds values that are not numbers"
        ) from None


def _load(
    files: list[Path],
    index: int,
    *,
    reader: ClientFileReader,
    label: str,
    features: tuple[str, ...],
) -> Partition:
    path = files[index]
    columns = reader.read(path, (*features, label), label=label)
    x, y = model_arrays(columns, label=label, features=features, where=f"file {path.name}")
    rows = np.arange(y.shape[0], dtype=np.int64)
    return Partition(index=index, id=path.stem, rows=rows, loader=functools.partial(_take, x, y))


def _take(x: FloatArray, y: LabelArray, rows: IndexArray) -> tuple[FloatArray, LabelArray]:
    return x[rows], y[rows]
