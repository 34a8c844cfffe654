"""Clustered FL end to end: on day and night devices (examples/day-night) it beats one global
model on both populations, its rows say who trained which cluster, and it resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from shoal.config import load_config
from shoal.core import RunError
from shoal.core.clusters import split_models
from shoal.registry import BlobStore, ModelRegistry, blob_location, registry_location
from shoal.simulation.runner import Simulation

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "day-night"
SMALL = ["run.rounds=6", "evaluation.every=3", "round.clients_per_round=10"]


@pytest.fixture(scope="module")
def app() -> Any:
    sys.path.insert(0, str(EXAMPLE))
    sys.modules.pop("app", None)  # another example's app.py, imported by a test before
    try:
        import app as day_night  # the example's own module

        yield day_night
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("app", None)


def simulate(folder: Path, *overrides: str, resume: bool = False) -> dict[str, Any]:
    config = load_config(EXAMPLE / "job.toml", [*SMALL, *overrides])
    return Simulation(config, folder, resume=resume, search_path=[EXAMPLE]).run()


def rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def head_model(folder: Path) -> Any:
    database = registry_location(folder, None).open()
    try:
        models = ModelRegistry(database, BlobStore(blob_location(folder, None)))
        head = models.head("global")
        assert head is not None
        return models.load("global", head.version)
    finally:
        database.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, app: Any) -> dict[str, Path]:
    folders = {name: tmp_path_factory.mktemp(name) for name in ("single", "clustered")}
    simulate(folders["single"], "clustering.clusters=1")
    simulate(folders["clustered"])
    return folders


def test_clustered_fl_beats_the_single_model_on_both_populations(
    runs: dict[str, Path], app: Any
) -> None:
    single = app.population_accuracy(head_model(runs["single"]), clusters=1, num_clients=20)
    clustered = app.population_accuracy(head_model(runs["clustered"]), clusters=2, num_clients=20)
    for which in ("day", "night"):
        assert clustered[which] > single[which] + 0.2, (single, clustered)


def test_the_rows_say_who_trained_and_how_each_cluster_scores(runs: dict[str, Path]) -> None:
    fits = [row for row in rows(runs["clustered"]) if row["phase"] == "fit"]
    assert all(sum(row["cluster_sizes"].values()) == row["reported"] for row in fits)
    assert "cluster" not in fits[-1]  # the choice is not averaged into a metric
    evaluation = [row for row in rows(runs["clustered"]) if row["phase"] == "evaluate"][-1]
    assert set(evaluation["cluster_accuracy"]) == {"0", "1"}  # each population found one
    assert min(evaluation["cluster_accuracy"].values()) > 0.7
    single = [row for row in rows(runs["single"]) if row["phase"] == "fit"]
    assert all("cluster_sizes" not in row for row in single)
    assert sum(row["drift_bimodal"] for row in single) >= len(single) // 2  # the drift sees it


def test_a_clustered_run_resumes_with_its_clusters(tmp_path: Path) -> None:
    simulate(tmp_path, "run.rounds=2")
    summary = simulate(tmp_path, "run.rounds=3", resume=True)
    assert summary["rounds_completed"] == 3 and summary["model_version"] == 3
    assert len(split_models(head_model(tmp_path), clusters=2)) == 2
    drift = [
        json.loads(line)["round"] for line in (tmp_path / "drift.jsonl").read_text().splitlines()
    ]
    assert drift == [1, 2, 3]
    fits = [row for row in rows(tmp_path) if row["phase"] == "fit"]
    assert [row["round"] for row in fits] == [1, 2, 3] and "cluster_sizes" in fits[-1]
    with pytest.raises(RunError, match=r"does not match clustering\.clusters = 3"):
        simulate(tmp_path, "run.rounds=4", "clustering.clusters=3", resume=True)
