"""The run report: one self-contained HTML file of a run's plots, or of several runs overlaid.

:func:`load_run` reads a run folder (``metrics.jsonl``, ``summary.json`` and
``drift.jsonl``; only the first is required, so a running run loads too),
:func:`figures` draws every plot as inline SVG, and :func:`write_report`
writes the page: inline CSS and SVG, no script, no external reference,
every string from a run escaped. The live dashboard draws the same figures.

A run folder may come from someone else: a line that is not a row (a JSON
object with an integer ``round``, see :mod:`shoal.telemetry.metrics`) is
left out with a warning, a summary that is not one is left out, and
every figure is drawn however large or small. Its files are read where
they point (a symlinked ``metrics.jsonl`` too, as ``cat`` would): only the
figures a row names are drawn, so a file that is not the run's shows
nothing of itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

from shoal.core.errors import RunError
from shoal.core.files import write_whole
from shoal.telemetry.metrics import (
    DRIFT_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    Row,
    describe_row,
    read_rows,
)
from shoal.telemetry.plots import Figure, RunData, figures
from shoal.telemetry.svg import escape, format_number

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"

__all__ = [
    "DRIFT_FILE",
    "REPORT_FILE",
    "Figure",
    "RunData",
    "figures",
    "load_run",
    "load_runs",
    "write_report",
]


def load_run(folder: Path, *, name: str | None = None) -> RunData:
    """Read the run folder ``folder``; RunError (one line) when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(f"no run folder at {folder}")
    metrics = folder / METRICS_FILE
    if not metrics.is_file():
        raise RunError(f"{folder} holds no {METRICS_FILE}: not a run folder")
    return RunData(
        name=name or folder.resolve().name,
        folder=folder,
        rows=tuple(_read_rows(metrics)),
        summary=_read_summary(folder / SUMMARY_FILE),
        drift=tuple(sorted(_read_rows(folder / DRIFT_FILE), key=itemgetter("round"))),
    )


def _read_rows(path: Path) -> list[Row]:
    """A JSON-lines file's rows; the lines that are not rows cost one warning."""
    rows, left_out = read_rows(path)
    if left_out:
        logger.warning(
            "%s: %d line%s left out (not %s), the first at line %d",
            path,
            len(left_out),
            "" if len(left_out) == 1 else "s",
            describe_row(path),
            left_out[0],
        )
    return rows


def load_runs(folders: Sequence[Path]) -> list[RunData]:
    """Read each run folder, named by its folder's name, or by its path where two share one."""
    names = [Path(folder).resolve().name for folder in folders]
    return [
        load_run(folder, name=str(Path(folder).resolve()) if names.count(name) > 1 else name)
        for folder, name in zip(folders, names, strict=True)
    ]


def _read_summary(path: Path) -> dict[str, Any]:
    """The summary, or {} while the run has none (or is writing it)."""
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, RecursionError):
        logger.warning("%s is not JSON (the run may be writing it): left out", path)
        return {}
    return summary if isinstance(summary, dict) else {}


# --- the page --------------------------------------------------------------------------------

SUMMARY_KEYS = (
    "rounds_completed",
    "rounds_aborted",
    "final_accuracy",
    "final_loss",
    "virtual_time_s",
    "wall_time_s",
    "drop_rate",
    "straggler_index",
    "fairness_gap",
    "bytes_up",
    "bytes_down",
    "bytes_up_per_client",
    "bytes_down_per_client",
    "epsilon",
    "drift_bimodal_rounds",
    "model_version",
)

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.1em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.none { color: #a33; }
nav a { margin-right: 1em; font-size: 0.9em; }
section svg { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def write_report(runs: Sequence[RunData], out: Path) -> Path:
    """Write the report of ``runs`` to ``out`` (whole or not at all, :func:`write_whole`; its
    folder is made); returns it. An OSError names ``out``: a folder there, say."""
    if not runs:
        raise RunError("a report needs at least one run")
    out = Path(out)
    page = render(runs).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_whole(out, lambda handle: handle.write(page))
    return out


def render(runs: Sequence[RunData]) -> str:
    """The report's HTML: a summary table, a table of contents and every figure."""
    drawn = figures(runs)
    names = ", ".join(run.name for run in runs)
    contents = "".join(f'<a href="#{figure.key}">{escape(figure.title)}</a>' for figure in drawn)
    sections = "".join(
        f'<section id="{figure.key}"><h2>{escape(figure.title)}</h2>{figure.svg}</section>'
        for figure in drawn
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Shoal run report: {escape(names)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>Shoal run report</h1>{_summary_table(runs)}<nav>{contents}</nav>"
        f"{sections}</body></html>\n"
    )


def _summary_table(runs: Sequence[RunData]) -> str:
    head = "".join(f"<th>{escape(run.name)}</th>" for run in runs)
    body = "".join(
        f"<tr><td>{key}</td>{''.join(_cell(run.summary.get(key)) for run in runs)}</tr>"
        for key in SUMMARY_KEYS
    )
    folders = "".join(f"<td>{escape(run.folder)}</td>" for run in runs)
    return (
        f'<table class="summary"><tr><th>run</th>{head}</tr>'
        f"<tr><td>folder</td>{folders}</tr>{body}</table>"
    )


def _cell(value: Any) -> str:
    if value is None:
        return '<td class="none">not recorded</td>'
    if isinstance(value, float):
        return f"<td>{escape(format_number(value))}</td>"
    return f"<td>{escape(value)}</td>"
