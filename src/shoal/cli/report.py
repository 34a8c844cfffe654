"""``shoal report RUN [RUN ...] --out report.html``: a run's plots in one self-contained HTML file.

Several runs are overlaid, one colour per run. The file needs no network to
open: its CSS and SVG are inline, and it holds no script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from shoal.cli.app import app, user_errors
from shoal.telemetry.report import REPORT_FILE, load_runs, write_report

console = Console(highlight=False)


@app.command("report")
@user_errors
def report(
    runs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN...", help="Run folders (metrics.jsonl, summary.json...)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path(
        REPORT_FILE
    ),
) -> None:
    """Write the HTML report of one run, or of several runs overlaid to compare them."""
    written = write_report(load_runs(runs), out)
    console.print(f"report: {escape(str(written))} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
