"""``shoal report``: writes the HTML file of one or several runs; a folder that is not a run is
one line and exit 1."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner, Result

from shoal.cli import app
from support.user_errors import EXIT_ENVIRONMENT, one_line_error


def shoal(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(arg) for arg in args])


def run_folder(folder: Path, accuracy: float) -> Path:
    folder.mkdir()
    rows = [  # a central evaluation's accuracy, in both columns, as the run writes it
        {
            "round": n,
            "phase": "fit",
            "accuracy": accuracy * n,
            "test_accuracy": accuracy * n,
            "virtual_time_s": 10.0 * n,
        }
        for n in (1, 2, 3)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_the_report_of_two_runs_is_written(tmp_path: Path) -> None:
    first, second = run_folder(tmp_path / "a", 0.2), run_folder(tmp_path / "b", 0.3)
    out = tmp_path / "reports" / "both.html"
    result = shoal("report", first, second, "--out", out)
    assert result.exit_code == 0, result.output
    assert "2 runs" in result.stdout
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and "a: central test" in html
    assert "b: central test" in html


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path: Path) -> None:
    for folder, message in ((tmp_path / "nope", "no run folder at"), (tmp_path, "not a run")):
        result = shoal("report", folder, "--out", tmp_path / "r.html")
        assert result.exit_code == 1
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_report_needs_a_run(tmp_path: Path) -> None:
    result = shoal("report", "--out", tmp_path / "r.html")
    assert result.exit_code == 2


def test_a_folder_as_the_output_is_one_line_naming_it(tmp_path: Path) -> None:
    """It said ``Is a directory: out.partial`` and left ``out.partial`` behind."""
    run = run_folder(tmp_path / "a", 0.2)
    out = tmp_path / "out"
    out.mkdir()
    result = shoal("report", run, "--out", out)
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=(f"is a folder, not a file: {out}",))
    assert ".partial" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "out"]
