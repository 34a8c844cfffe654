"""The run's metrics log: one JSON object per round and phase in ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]

METRICS_FILE = "metrics.jsonl"  # in a run folder: the rows
SUMMARY_FILE = "summary.json"  # in a run folder: the final figures


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
        """Every complete row; a line torn by a crash is skipped (see :func:`read_rows`)."""
        return read_rows(self.path)[0]

    def truncate(self, keep: Callable[[Row], bool]) -> list[Row]:
        """Keep only the rows ``keep`` accepts (atomically); returns them. The appends go on
        to the new file."""
        kept = [row for row in self.rows() if keep(row)]
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))
        self.close()
        partial.replace(self.path)
        return kept


def read_rows(path: Path) -> tuple[list[Row], int]:
    """The JSON objects of a JSON-lines file (none when it is missing), and how many lines were
    left out: not JSON, not an object, or nested past the parser's depth. A last line without
    its newline that is not a row (being written, or torn by a crash) is left out uncounted."""
    if not path.exists():
        return [], 0
    *lines, last = path.read_text(errors="replace").split("\n")
    rows = [row for row in map(_object, lines) if row is not None]
    skipped = sum(1 for line in lines if line.strip()) - len(rows)
    if (row := _object(last)) is not None:
        rows.append(row)
    return rows, skipped


def _object(line: str) -> Row | None:
    """The JSON object on ``line``, or None."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None
