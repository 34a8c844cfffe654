"""Clustered FL that starts when the drift flags (``[clustering] start = "flagged"``): one model
until a round's drift sees distinct populations, then one model per population; it splits once,
deterministically, survives a resume and a rollback across the split, and never splits a
population of one kind."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import shoal
from shoal.config import load_config
from shoal.coordinator.run import Run
from shoal.core.clusters import stacked_clusters
from shoal.core.parameters import Parameters
from shoal.governance.model_signing import PUBLIC_KEY_FILE, load_public_key
from shoal.registry import verify_audit_log
from shoal.simulation.runner import Simulation, open_run_models

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "day-night"
SMALL = ["run.rounds=6", "evaluation.every=3", "round.clients_per_round=10"]
FLAGGED = "clustering.start='flagged'"


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    sys.path.insert(0, str(EXAMPLE))
    sys.modules.pop("app", None)  # another example's app.py, imported by a test before
    try:
        import app as day_night  # the example's own module

        yield day_night
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("app", None)


def simulate(
    folder: Path,
    *overrides: str,
    resume: bool = False,
    on_round: Callable[[Simulation, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    config = load_config(EXAMPLE / "job.toml", [*SMALL, FLAGGED, *overrides])
    simulation = Simulation(config, folder, resume=resume, search_path=[EXAMPLE])
    if on_round is None:
        return simulation.run()
    return simulation.run(on_round=lambda row: on_round(simulation, row))


def rows(folder: Path, phase: str = "fit") -> list[dict[str, Any]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["phase"] == phase]


def version(folder: Path, number: int | None = None) -> Parameters:
    """The run's version ``number`` (None: HEAD)."""
    models = open_run_models(folder)
    try:
        head = models.head("global")
        assert head is not None
        return models.load("global", head.version if number is None else number)
    finally:
        models.database.close()


def audited_splits(folder: Path) -> list[dict[str, Any]]:
    models = open_run_models(folder)
    try:
        return [dict(entry.details) for entry in models.audit.entries(kind="clustered_split")]
    finally:
        models.database.close()


def split_rounds(folder: Path) -> list[int]:
    return [row["round"] for row in rows(folder) if "clustered_split" in row]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, app: Any) -> dict[str, Path]:
    folders = {name: tmp_path_factory.mktemp(name) for name in ("single", "flagged", "again")}
    simulate(folders["single"], "clustering.clusters=1", "clustering.start='always'")
    simulate(folders["flagged"])
    simulate(folders["again"], "simulation.workers=2")  # its worker measures the drift
    return folders


def test_the_run_splits_once_when_the_drift_flags_and_then_trains_per_cluster(
    runs: dict[str, Path],
) -> None:
    folder = runs["flagged"]
    fits = rows(folder)
    (at,) = split_rounds(folder)
    split = next(row for row in fits if row["round"] == at)
    assert split["drift_bimodal"] and split["clustered_split"]["round"] == at
    assert split["clustered_split"]["clusters"] == 2
    assert sum(split["clustered_split"]["sizes"]) == split["reported"]
    # before and at the split, clients trained the one model; after it, the cluster models
    assert all("cluster_sizes" not in row for row in fits if row["round"] <= at)
    after = [row for row in fits if row["round"] > at]
    assert after and all(sum(row["cluster_sizes"].values()) == row["reported"] for row in after)
    assert all(len(row["cluster_sizes"]) == 2 for row in after)  # both populations chose one
    assert stacked_clusters(version(folder, 0)) is None  # the run started with one model
    assert stacked_clusters(version(folder, split["model_version"] - 1)) is None
    assert stacked_clusters(version(folder, split["model_version"])) == 2  # the split's version
    assert stacked_clusters(version(folder)) == 2
    # the stack weighs about twice as much on the wire (one header, two models' values)
    assert 1.9 * split["bytes_down"] < after[0]["bytes_down"] < 2 * split["bytes_down"]
    (entry,) = audited_splits(folder)
    assert (
        entry["version"] == split["model_version"]
        and entry["sizes"] == split["clustered_split"]["sizes"]
    )


def test_both_populations_end_better_than_with_one_model(runs: dict[str, Path], app: Any) -> None:
    single = app.population_accuracy(version(runs["single"]), clusters=1, num_clients=20)
    flagged = app.population_accuracy(version(runs["flagged"]), clusters=2, num_clients=20)
    for which in ("day", "night"):
        assert flagged[which] > single[which] + 0.2, (single, flagged)
    evaluation = rows(runs["flagged"], "evaluate")[-1]
    assert set(evaluation["cluster_accuracy"]) == {"0", "1"}
    assert min(evaluation["cluster_accuracy"].values()) > 0.7


def test_the_same_seed_splits_at_the_same_round_into_the_same_models(
    runs: dict[str, Path],
) -> None:
    # "again" ran with a pool: the split waited for the drift its worker measured
    assert split_rounds(runs["again"]) == split_rounds(runs["flagged"])
    assert version(runs["again"]).sha256() == version(runs["flagged"]).sha256()


def test_a_resume_after_the_split_keeps_the_clusters(tmp_path: Path, app: Any) -> None:
    simulate(tmp_path, "run.rounds=2")
    summary = simulate(tmp_path, "run.rounds=3", resume=True)
    assert summary["rounds_completed"] == 3 and summary["model_version"] == 3
    assert stacked_clusters(version(tmp_path)) == 2 and len(split_rounds(tmp_path)) == 1
    assert "cluster_sizes" in rows(tmp_path)[-1] and len(audited_splits(tmp_path)) == 1


def test_a_resume_before_the_split_goes_on_with_one_model_and_splits_later(
    tmp_path: Path, app: Any
) -> None:
    simulate(tmp_path, "run.rounds=2", "drift.bimodal_threshold=1")  # nothing is ever flagged
    assert stacked_clusters(version(tmp_path)) is None and split_rounds(tmp_path) == []
    simulate(tmp_path, "run.rounds=4", resume=True)
    assert split_rounds(tmp_path) == [3]
    assert stacked_clusters(version(tmp_path)) == 2 and "cluster_sizes" in rows(tmp_path)[-1]


def test_a_rollback_to_a_version_before_the_split_returns_to_one_model(
    tmp_path: Path, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The playbook's path: HEAD rolled back to version 0 as round 2 closes, the engine
    restored from it (the next round not started ahead, as for a BAD verdict); the next round
    trains the one model again, and the drift splits it again."""
    seen: dict[int, tuple[int | None, int]] = {}
    close_round = Run.close_round

    def closing(self: Run, summary: Any, commit: Any, extra: Any, *, ahead: Any = None) -> Any:
        if summary.round != 2:
            return close_round(self, summary, commit, extra, ahead=ahead)
        row = close_round(self, summary, commit, extra)
        engine = self.coordinator
        seen[2] = (stacked_clusters(engine.parameters), engine.strategy.clusters)
        record = self.store.rollback(0, "a test's rollback across the split")
        self._roll_engine_back(record)
        seen[0] = (stacked_clusters(engine.parameters), engine.strategy.clusters)
        return row

    def after(simulation: Simulation, row: dict[str, Any]) -> None:
        if row["round"] != 2:
            engine = simulation.coordinator
            seen[row["round"]] = (stacked_clusters(engine.parameters), engine.strategy.clusters)

    monkeypatch.setattr(Run, "close_round", closing)
    simulate(tmp_path, "run.rounds=3", "playbook.enabled=false", on_round=after)
    assert seen[1] == seen[2] == (2, 2)  # split in round 1
    assert seen[0] == (None, 1)  # rolled back: one model, one strategy
    assert split_rounds(tmp_path) == [1, 3] and seen[3] == (2, 2)
    assert len(audited_splits(tmp_path)) == 2


def test_a_population_of_one_kind_never_splits(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "run.rounds=3",
            "data.num_clients=20",
            "data.partition='iid'",
            "round.clients_per_round=10",
            "round.over_selection=1.0",
            "round.deadline_s=600",
            "evaluation.every=0",
            "clustering.clusters=2",
            FLAGGED,
            "simulation.workers=0",
        ],
    )
    Simulation(config, tmp_path).run()
    fits = rows(tmp_path)
    assert len(fits) == 3 and all(row["drift_available"] for row in fits)
    assert not any(row["drift_bimodal"] for row in fits)
    assert split_rounds(tmp_path) == [] and audited_splits(tmp_path) == []
    assert stacked_clusters(version(tmp_path)) is None
    assert all("cluster_sizes" not in row for row in fits)


def test_unlearning_a_client_of_the_split_round_replays_the_split(
    runs: dict[str, Path], tmp_path: Path, app: Any
) -> None:
    (at,) = split_rounds(runs["flagged"])
    # the first client (in id order) that trained in the split round: forgetting it goes back
    # before the split, to the one model of version 0
    for number in range(20):
        folder = tmp_path / f"forget-{number}"
        shutil.copytree(runs["flagged"], folder)
        report = shoal.unlearn(folder, f"client-{number:05d}", actor="test")
        if report.first_participation == at:
            break
    else:
        pytest.fail(f"no client trained in round {at}")
    assert report.restart_version == 0 and report.retrained
    assert stacked_clusters(version(folder, report.restart_version)) is None
    # the retraining, without that client, splits again and goes on with the cluster models
    (again,) = [
        row for row in rows(folder)[-len(report.recomputed_rounds) :] if "clustered_split" in row
    ]
    assert again["model_version"] > report.old_head_version
    assert stacked_clusters(version(folder)) == 2
    assert [entry["version"] for entry in audited_splits(folder)][-1] == again["model_version"]
    models = open_run_models(folder)
    try:
        pinned = load_public_key(folder / PUBLIC_KEY_FILE)
        assert verify_audit_log(models.database, pinned.verify_audit_head).intact
    finally:
        models.database.close()
