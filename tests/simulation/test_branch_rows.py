"""A run resumed on another branch: its rows are HEAD's lineage's, not the branch it left."""

from __future__ import annotations

import json
from pathlib import Path

from shoal.config import Config, load_config
from shoal.simulation.runner import MODEL_NAME, Simulation, open_run_models
from support.jobs import bare_config


def job(rounds: int) -> Config:
    return bare_config(
        [
            f"run.rounds={rounds}",
            "data.num_clients=8",
            "round.clients_per_round=4",
            "round.deadline_s=600",
            "evaluation.every=0",
            "simulation.workers=0",
        ]
    )


def rollback(folder: Path, version: int) -> None:
    models = open_run_models(folder)
    try:
        models.rollback(MODEL_NAME, version, reason="an operator's")
    finally:
        models.database.close()


def fit_rows(folder: Path) -> list[tuple[int, int, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["model_version"], r["loss"]) for r in rows if r["phase"] == "fit"]


def test_rows_after_a_rollback_to_another_branch_are_that_branchs(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    Simulation(job(6), folder).run()  # versions 1..6 on branch A
    branch_a = fit_rows(folder)
    rollback(folder, 3)
    Simulation(job(6), folder, resume=True).run()  # rounds 4..6 again: versions 7..9, branch B
    assert [version for _, version, _ in fit_rows(folder)] == [1, 2, 3, 7, 8, 9]
    rollback(folder, 6)  # back to branch A (a false alarm)
    Simulation(job(7), folder, resume=True).run()
    rows = fit_rows(folder)
    # rounds 4..6 named branch B's versions 7..9 (and their losses) under HEAD's version 10,
    # whose ancestors are 6, 5 and 4
    assert [version for _, version, _ in rows] == [1, 2, 3, 4, 5, 6, 10]
    assert rows[:6] == branch_a
    drift = [
        json.loads(line)["round"] for line in (folder / "drift.jsonl").read_text().splitlines()
    ]
    assert drift == [1, 2, 3, 7]  # branch B's projections left; A's are not kept with versions


def test_a_crash_resume_keeps_the_rounds_the_playbook_rolled_back(tmp_path: Path) -> None:
    """The playbook's BAD versions lie off HEAD's lineage, below HEAD's round, and the run went
    on from the next round: a resume took their rows for an abandoned branch's and cut the
    run's history from the first of them."""
    example = Path(__file__).resolve().parents[2] / "examples" / "poisoning.toml"
    config = load_config(example, ["run.rounds=22", "simulation.workers=0"])
    folder = tmp_path / "run"
    Simulation(config, folder).run()
    before = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert any((row.get("playbook") or {}).get("verdict") == "bad" for row in before)
    more = load_config(example, ["run.rounds=23", "simulation.workers=0"])
    Simulation(more, folder, resume=True).run()
    after = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert after[: len(before)] == before and after[-1]["round"] == 23
