"""The run report: a real simulation's folder, read and drawn; runs overlaid; hostile names."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from shoal import simulate
from shoal.core.errors import RunError
from shoal.telemetry.plots import FIGURE_KEYS, NOT_RECORDED
from shoal.telemetry.report import (
    REPORT_FILE,
    Figure,
    RunData,
    figures,
    load_run,
    load_runs,
    render,
    write_report,
)

SMALL_RUN = (
    "data.num_clients=12",
    "round.clients_per_round=4",
    "round.deadline_s=600",
    "evaluation.every=1",
    "evaluation.clients=4",
    "simulation.workers=0",
)
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real simulation's run folder (three rounds, written report included)."""
    folder = tmp_path_factory.mktemp("runs") / "small"
    simulate(out=folder, rounds=3, overrides=SMALL_RUN)
    return folder


def copy_run(source: Path, target: Path, *, rows: Any = None, drift: Any = None) -> Path:
    """A copy of a run's files; ``rows`` rewrites each row, ``drift`` adds drift records."""
    target.mkdir(parents=True)
    for name in ("metrics.jsonl", "summary.json"):
        shutil.copy(source / name, target / name)
    if rows is not None:
        lines = (target / "metrics.jsonl").read_text().splitlines()
        changed = [json.dumps(rows(json.loads(line))) for line in lines]
        (target / "metrics.jsonl").write_text("\n".join(changed) + "\n")
    if drift is not None:
        text = "".join(json.dumps(record) + "\n" for record in drift)
        (target / "drift.jsonl").write_text(text)
    return target


def by_key(drawn: list[Figure]) -> dict[str, Figure]:
    return {figure.key: figure for figure in drawn}


def drift_record(round_number: int, *, client: str = "p-1") -> dict[str, Any]:
    return {
        "round": round_number,
        "method": "pca",
        "points": [[0.0, 1.0], [0.2, 0.9], [5.0, -1.0], [5.1, -1.2]],
        "labels": [0, 0, 1, 1],
        "clients": [client, "p-2", "p-3", "p-4"],
        "explained_variance": [0.8, 0.1],
    }


def with_fairness(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the telemetry writes it, with its fairness by device class."""
    accuracy = 0.9 if row["phase"] == "evaluate" else None
    row["fairness"] = {
        "phone": {"population_share": 0.7, "participation_share": 0.5, "accuracy": accuracy},
        HOSTILE: {"population_share": 0.3, "participation_share": 0.5, "accuracy": accuracy},
    }
    return row


def test_the_run_writes_its_report_with_every_plot(run_folder: Path) -> None:
    html = (run_folder / REPORT_FILE).read_text()
    run = load_run(run_folder)
    drawn = figures([run])
    assert [figure.key for figure in drawn] == list(FIGURE_KEYS)
    for figure in drawn:
        assert f'<section id="{figure.key}">' in html
        assert figure.svg in html
        svg = ET.fromstring(figure.svg)  # well-formed XML, each one
        assert svg.tag == "svg" and svg.find("title") is not None
    assert (
        len(run.rows) == 6 and run.summary["rounds_completed"] + run.summary["rounds_aborted"] == 3
    )


def test_a_point_per_value_with_its_tooltip(run_folder: Path) -> None:
    run = load_run(run_folder)
    accuracies = [row["accuracy"] for row in run.rows if row["accuracy"] is not None]
    svg = ET.fromstring(by_key(figures([run]))["accuracy-round"].svg)
    tips = [circle.findtext("title") for circle in svg.iter("circle")]
    assert len(tips) == len(accuracies) > 0
    assert all(tip and "round" in tip for tip in tips)
    assert svg.find(".//g[@class='axes']") is not None


def test_a_run_without_drift_or_fairness_says_not_recorded(
    run_folder: Path, tmp_path: Path
) -> None:
    keys = ("drift", "fairness-participation", "fairness-accuracy")
    recorded = by_key(figures([load_run(run_folder)]))  # a run of today records them all
    assert all(NOT_RECORDED not in recorded[key].svg for key in keys)
    older = copy_run(  # a run from before the fleet telemetry: no drift.jsonl, no fairness
        run_folder,
        tmp_path / "older",
        rows=lambda row: {k: v for k, v in row.items() if not k.startswith("fairness")},
    )
    drawn = by_key(figures([load_run(older)]))
    for key in keys:
        assert NOT_RECORDED in drawn[key].svg
    assert NOT_RECORDED not in drawn["accuracy-round"].svg


def test_two_runs_overlay_one_colour_each(run_folder: Path, tmp_path: Path) -> None:
    other = copy_run(run_folder, tmp_path / "other", rows=lambda row: {**row, "accuracy": 0.5})
    runs = load_runs([run_folder, other])
    svg = ET.fromstring(by_key(figures(runs))["accuracy-round"].svg)
    lines = [line for line in svg.iter("polyline") if line.findtext("title", "").endswith("test")]
    assert {line.findtext("title") for line in lines} == {
        "small: central test",
        "other: central test",
    }
    assert len({line.get("stroke") for line in lines}) == 2
    legend = "".join(svg.find(".//g[@class='legend']").itertext())  # type: ignore[union-attr]
    assert "small: central test" in legend and "other: central test" in legend


def test_drift_is_drawn_with_its_clusters_and_a_run_without_it_is_named(
    run_folder: Path, tmp_path: Path
) -> None:
    drifting = copy_run(
        run_folder, tmp_path / "drifting", drift=[drift_record(n) for n in range(1, 10)]
    )
    without = copy_run(run_folder, tmp_path / "small")  # its drift.jsonl left behind
    figure = by_key(figures(load_runs([drifting, without])))["drift"]
    svg = ET.fromstring(figure.svg)
    tips = [circle.findtext("title") or "" for circle in svg.iter("circle")]
    assert "p-1: cluster 0, round 9" in tips and "p-3: cluster 1, round 9" in tips
    rounds_drawn = {tip.rsplit(" ", 1)[1] for tip in tips}
    assert "9" in rounds_drawn and 1 < len(rounds_drawn) <= 7  # the last and a few earlier
    assert f"small: {NOT_RECORDED}" in figure.svg
    assert "PC1 (80%)" in figure.svg


def test_a_tsne_projection_names_its_axes(run_folder: Path, tmp_path: Path) -> None:
    record = {**drift_record(1), "method": "tsne", "explained_variance": None}
    folder = copy_run(run_folder, tmp_path / "tsne", drift=[record])
    svg = by_key(figures([load_run(folder)]))["drift"].svg
    assert "tsne 1" in svg and "tsne 2" in svg and "PC1" not in svg


def test_fairness_by_device_class_is_drawn_and_escaped(run_folder: Path, tmp_path: Path) -> None:
    fair = copy_run(run_folder, tmp_path / "fair", rows=with_fairness)
    drawn = by_key(figures([load_run(fair)]))
    for key in ("fairness-participation", "fairness-accuracy"):
        svg = ET.fromstring(drawn[key].svg)
        assert len(list(svg.iter("rect"))) > 2  # the background and a bar per class
        assert HOSTILE not in drawn[key].svg and "&lt;script&gt;" in drawn[key].svg
        assert NOT_RECORDED not in drawn[key].svg


def test_a_hostile_run_name_is_escaped_and_nothing_is_fetched(
    run_folder: Path, tmp_path: Path
) -> None:
    hostile = load_run(
        copy_run(run_folder, tmp_path / "h", drift=[drift_record(1, client=HOSTILE)])
    )
    named = RunData(HOSTILE, hostile.folder, hostile.rows, hostile.summary, hostile.drift)
    out = write_report([named, load_run(run_folder)], tmp_path / "out" / "report.html")
    html = out.read_text()
    assert "<script" not in html.lower() and "&lt;script&gt;alert(1)" in html
    assert re.search(r"https?://", html) is None
    assert re.search(r"""(src|href)=["'](?!#)""", html) is None  # only in-page anchors
    assert "@import" not in html and "url(" not in html


def test_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no run folder at"):
        load_run(tmp_path / "missing")
    with pytest.raises(RunError, match=r"holds no metrics\.jsonl"):
        load_run(tmp_path)
    with pytest.raises(RunError, match="at least one run"):
        write_report([], tmp_path / "report.html")


def test_a_running_run_loads_without_summary_and_torn_lines(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"round": 1, "phase": "fit", "accuracy": 0.5, "virtual_time_s": 1.0})
        + '\n{"round": 2, "pha'
    )
    (tmp_path / "summary.json").write_text('{"rounds_comp')  # being written
    run = load_run(tmp_path)
    assert len(run.rows) == 1 and run.summary == {} and run.drift == ()
    html = render([run])
    assert "not recorded" in html and figures([]) == []


def test_two_folders_of_one_name_are_told_apart(run_folder: Path, tmp_path: Path) -> None:
    twin = copy_run(run_folder, tmp_path / "small")
    names = [run.name for run in load_runs([run_folder, twin])]
    assert len(set(names)) == 2


def test_clustered_runs_draw_one_line_per_cluster_model(run_folder: Path, tmp_path: Path) -> None:
    def clustered(row: dict[str, Any]) -> dict[str, Any]:
        if row["phase"] != "evaluate":
            return row
        return {**row, "cluster_accuracy": {"0": 0.9, "1": 0.8}}

    drawn = by_key(figures([load_run(copy_run(run_folder, tmp_path / "ifca", rows=clustered))]))
    svg = ET.fromstring(drawn["cluster-accuracy"].svg)
    lines = {line.findtext("title") for line in svg.iter("polyline")}
    assert lines == {"cluster 0", "cluster 1"}  # the clusters the run had, no more
    plain = by_key(figures([load_run(run_folder)]))["cluster-accuracy"].svg
    assert NOT_RECORDED in plain
