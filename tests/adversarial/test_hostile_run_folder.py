"""A run folder handed to ``shoal report`` (or shown by the dashboard) by someone else, and
figures a client chose: every line that is not a row is left out, every figure is drawn, and
nothing in the page can run or fetch."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.dashboard.state import RunReader
from shoal.telemetry.report import load_run
from support.user_errors import EXIT_ENVIRONMENT, invoke, one_line_error

DEEP = "[" * 100_000 + "]" * 100_000  # past the JSON parser's recursion limit
HOSTILE = '"><script>alert(1)</script><a href="javascript:alert(2)">x</a>'


def row(round_number: int, **fields: Any) -> dict[str, Any]:
    return {"round": round_number, "phase": "fit", "virtual_time_s": round_number, **fields}


def run_folder(
    folder: Path, lines: list[str], *, drift: list[str] | None = None, summary: str | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if drift is not None:
        (folder / "drift.jsonl").write_text("\n".join(drift) + "\n")
    if summary is not None:
        (folder / "summary.json").write_text(summary)
    return folder


def report(folder: Path, out: Path) -> str:
    """``shoal report`` run for real: it must succeed, and the page it wrote."""
    result = CliRunner().invoke(app, ["report", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out.read_text()


def assert_inert(html: str) -> None:
    """No markup of the run's own: nothing runs, nothing is fetched."""
    assert "<script" not in html.lower()
    assert re.search(r"""(src|href)=["'](?!#)""", html) is None  # only in-page anchors


@pytest.mark.parametrize(
    "garbage",
    ["[1, 2]", "5", '"a row?"', "null", DEEP, '{"round": ' + "9" * 5000 + "}", "\x00\xff"],
)
def test_a_line_that_is_not_a_row_is_left_out_with_a_warning(
    tmp_path: Path, garbage: str, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [json.dumps(row(1, accuracy=0.5)), garbage, json.dumps(row(2, accuracy=0.6))]
    folder = run_folder(tmp_path / "run", lines)
    with caplog.at_level(logging.WARNING):
        run = load_run(folder)
    assert [entry["round"] for entry in run.rows] == [1, 2]
    assert "1 line" in caplog.text and "metrics.jsonl" in caplog.text
    assert "<svg" in report(folder, tmp_path / "report.html")


def test_a_summary_or_drift_record_of_another_shape_is_left_out(tmp_path: Path) -> None:
    drift = [
        "[1]",
        DEEP,
        json.dumps({"round": 1, "points": [[0, 1], [1, 2]], "labels": {"a": 1}}),
        json.dumps({"round": 2, "points": [[0, 1], [1, 2]], "clients": {"a": "b"}}),
        json.dumps({"round": 3, "points": {"0": [1, 2]}, "explained_variance": 5}),
        json.dumps({"round": "x", "points": [[0, 1]], "labels": [True, 10**30], "method": 7}),
    ]
    folder = run_folder(
        tmp_path / "run",
        [json.dumps(row(1, accuracy=0.5))],
        drift=drift,
        summary='{"final_accuracy": ' + DEEP + "}",
    )
    run = load_run(folder)
    assert run.summary == {} and len(run.drift) == 3  # round "x" is no round
    assert "Drift" in report(folder, tmp_path / "report.html")


def test_figures_a_client_chose_are_drawn(tmp_path: Path) -> None:
    """A client reports its training time and its loss: 0 then the smallest float, and the
    largest floats of both signs, a number past any float, an infinity."""
    lines = [
        json.dumps(row(1, train_p50_s=0.0, loss=1.7e308, accuracy=10**400)),
        json.dumps(row(2, train_p50_s=5e-324, loss=-1.7e308, accuracy=float("inf"))),
        json.dumps(row(10**400, train_p50_s=1e-320, loss=float("nan"))),
        json.dumps(row(3, fairness={HOSTILE: {"participation_share": 1e308}})),
    ]
    html = report(run_folder(tmp_path / "run", lines), tmp_path / "report.html")
    assert_inert(html)
    assert re.search(r'(x|y|x1|y1|x2|y2|cx|cy|height|points)="[^"]*(nan|inf)', html) is None


def test_strings_from_the_run_are_text_everywhere(tmp_path: Path) -> None:
    lines = [json.dumps(row(1, accuracy=0.5, fairness={HOSTILE: {"accuracy": 0.5}}))]
    drift = [json.dumps({"round": 1, "points": [[0, 1]], "clients": [HOSTILE], "method": HOSTILE})]
    summary = json.dumps({"model_version": HOSTILE, "final_accuracy": HOSTILE})
    folder = run_folder(tmp_path / HOSTILE.replace("/", "_"), lines, drift=drift, summary=summary)
    html = report(folder, tmp_path / "report.html")
    assert_inert(html)
    assert "&lt;script&gt;" in html


def test_the_dashboard_reads_a_hostile_folder_as_rows(tmp_path: Path) -> None:
    lines = [json.dumps(row(1)), "[1]", DEEP, json.dumps({"round": "x"}), '{"round": 1e999}']
    folder = run_folder(tmp_path / "run", lines, summary=DEEP)
    (folder / "config.json").write_text('["not", "a", "config"]')
    reader = RunReader(folder)
    try:
        snapshot = reader.snapshot()
    finally:
        reader.close()
    assert snapshot.current_round == 1 and snapshot.summary is None
    assert snapshot.run_name == "run"


def test_a_line_being_written_costs_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The dashboard reads a running run's file as the coordinator appends to it."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps(row(1)) + '\n{"round": 2, "pha')
    with caplog.at_level(logging.WARNING):
        assert [entry["round"] for entry in load_run(folder).rows] == [1]
    assert caplog.text == ""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-round simulation, copied by each test that spoils it."""
    base = tmp_path_factory.mktemp("run")
    (base / "job.toml").write_text(
        "[run]\nrounds = 2\n[data]\nnum_clients = 6\n[round]\nclients_per_round = 3\n"
        "[evaluation]\nevery = 1\nclients = 3\n[simulation]\nworkers = 0\n"
        "[report]\nenabled = false\n"
    )
    result = invoke("simulate", base / "job.toml", "-q", "--out", base / "run")
    assert result.exit_code == 0, result.output
    return base / "run"


@pytest.mark.parametrize("name", ["metrics.jsonl", "drift.jsonl"])
@pytest.mark.parametrize(
    "line",
    [
        "{}",
        '{"round": "x", "phase": "fit"}',
        '{"round": null, "phase": "fit"}',
        '{"round": true, "phase": "fit"}',
        '{"round": 1.5, "phase": "fit"}',
        "[1]",
    ],
)
def test_a_resume_refuses_a_line_that_is_not_a_row_naming_it(
    finished_run: Path, tmp_path: Path, name: str, line: str
) -> None:
    """A resume rewrites both files: a KeyError or TypeError traceback before, and what it
    cannot read must not be dropped silently. ``shoal report`` leaves the line out."""
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    before = (folder / name).read_text() if (folder / name).exists() else ""
    (folder / name).write_text(before + line + "\n")
    result = invoke("simulate", "--resume", folder, "--rounds", "3", "-q")
    number = before.count("\n") + 1
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=(f"{name}: line {number} is not a row",))
    assert (folder / name).read_text() == before + line + "\n"  # kept for the user to mend
    assert [row["round"] for row in load_run(folder).rows] == [1, 1, 2, 2]  # committed, kept


def test_a_row_carries_an_integer_round_and_its_phase_for_report_and_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [
        json.dumps(row(1)),
        json.dumps({"round": 2}),
        json.dumps({"round": True, "phase": "fit"}),
        json.dumps(row(3)),
    ]
    folder = run_folder(tmp_path / "run", lines, drift=["{}", json.dumps({"round": 1})])
    with caplog.at_level(logging.WARNING):
        run = load_run(folder)
    assert [entry["round"] for entry in run.rows] == [1, 3]
    assert [entry["round"] for entry in run.drift] == [1]
    assert "metrics.jsonl: 2 lines left out" in caplog.text and "first at line 2" in caplog.text
    assert "drift.jsonl: 1 line left out" in caplog.text
