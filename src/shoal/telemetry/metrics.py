"""The run's metrics log: one JSON object per round and phase in ``metrics.jsonl``.

A line is a row when it is a JSON object holding what every row of its file
holds (:data:`ROW_FIELDS`): an integer ``round`` in each file, and the
``phase`` as text in ``metrics.jsonl``. Readers of a folder that may come from
someone else (``shoal report``, the dashboard) leave the other lines out; a
rewrite (:meth:`MetricsLog.truncate`, on a resume) refuses to drop them.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shoal.core.errors import RunError

Row = dict[str, Any]

METRICS_FILE = "metrics.jsonl"  # in a run folder: the rows
DRIFT_FILE = "drift.jsonl"  # in a run folder: each fit round's drift projection
SUMMARY_FILE = "summary.json"  # in a run folder: the final figures

# what every row of a file carries, with its exact type (a bool is no round number)
ROUND_FIELDS: Mapping[str, type] = {"round": int}
ROW_FIELDS: Mapping[str, Mapping[str, type]] = {
    METRICS_FILE: {"round": int, "phase": str},
    DRIFT_FILE: ROUND_FIELDS,
}
_TYPE_NAMES = {int: "an integer", str: "text"}


def _clean(value: Any) -> Any:
    """NaN and infinity are not JSON: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    return value


def clean_row(row: Row) -> Row:
    """A row with NaN and infinity replaced by None, ready for strict JSON."""
    cleaned: Row = _clean(row)
    return cleaned


_STRICT_SORTED = json.JSONEncoder(sort_keys=True, allow_nan=False)  # made once, not per row


def strict_line(row: Row) -> str:
    """``row`` as one line of strict JSON, keys sorted, NaN and infinity as null: encoded as
    it is, and cleaned first only when the encoder refuses it (a row seldom holds NaN, and
    the walk costs more than the encoding)."""
    try:
        return _STRICT_SORTED.encode(row)
    except ValueError:
        return json.dumps(clean_row(row), sort_keys=True)


class MetricsLog:
    """Append-only JSON lines, one write per row.

    Rows are not fsynced: the row of every committed round is also stored in
    its model version, which is, so a resumed run rebuilds a lost last row.
    The log appends through one descriptor of ``O_APPEND``, opened at its first
    append and kept until :meth:`close` (or until the log is collected): opening
    and closing the file for each row cost more than the write itself, which
    a round pays for each log it appends to.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._descriptor: int | None = None
        self._closer: weakref.finalize[Any, MetricsLog] | None = None

    def append(self, row: Row) -> None:
        self.append_line(strict_line(row))

    def append_line(self, line: str) -> None:
        """Append ``line`` (one JSON value, no newline in it) and a newline in one write."""
        if self._descriptor is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._descriptor = os.open(self.path, flags, 0o666)
            self._closer = weakref.finalize(self, os.close, self._descriptor)
        data = (line + "\n").encode()
        written = os.write(self._descriptor, data)
        while written < len(data):  # a regular file takes it all but on a full disk
            written += os.write(self._descriptor, data[written:])

    def close(self) -> None:
        """Close the descriptor of the appends, if one is open (the next append opens one)."""
        if self._closer is not None:
            self._closer()
        self._descriptor, self._closer = None, None

    def rows(self) -> list[Row]:
        """Every row; a line that is not one, or is torn, is left out (:func:`read_rows`)."""
        return read_rows(self.path)[0]

    def truncate(self, keep: Callable[[Row], bool]) -> list[Row]:
        """Keep only the rows ``keep`` accepts (atomically); returns them. The appends go on
        to the new file. A line that is not a row (but a torn last one) is refused, as one
        :class:`RunError` naming the file and the line: rewriting the file would lose it."""
        rows, left_out = read_rows(self.path)
        if left_out:
            raise RunError(
                f"{self.path}: line {left_out[0]} is not a row ({describe_row(self.path)}): "
                "mend or remove it"
            )
        kept = [row for row in rows if keep(row)]
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))
        self.close()
        partial.replace(self.path)
        return kept


def row_fields(path: Path) -> Mapping[str, type]:
    """What every row of the run file ``path`` carries (an integer ``round`` in any other)."""
    return ROW_FIELDS.get(path.name, ROUND_FIELDS)


def describe_row(path: Path) -> str:
    """What a row of ``path`` is, in words: ``a JSON object with round as an integer``."""
    fields = " and ".join(
        f"{name} as {_TYPE_NAMES[kind]}" for name, kind in row_fields(path).items()
    )
    return f"a JSON object with {fields}"


def read_rows(path: Path) -> tuple[list[Row], list[int]]:
    """The rows of a run's JSON-lines file (none when it is missing), and the numbers (from 1)
    of the lines left out: not JSON, not an object, nested past the parser's depth, or without
    what every row of the file carries (:func:`row_fields`). A last line without its newline
    that is not a row (being written, or torn by a crash) is left out unnumbered."""
    if not path.exists():
        return [], []
    *lines, last = path.read_text(errors="replace").split("\n")
    fields = row_fields(path)
    rows: list[Row] = []
    left_out: list[int] = []
    for number, line in enumerate(lines, start=1):
        row = _row(line, fields)
        if row is not None:
            rows.append(row)
        elif line.strip():
            left_out.append(number)
    if (row := _row(last, fields)) is not None:
        rows.append(row)
    return rows, left_out


def _row(line: str, fields: Mapping[str, type]) -> Row | None:
    """The row on ``line``, or None: a JSON object with each of ``fields`` of its exact type."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(row, dict):
        return None
    return row if all(type(row.get(name)) is kind for name, kind in fields.items()) else None
