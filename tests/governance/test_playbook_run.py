"""The playbook in a run: a poisoned round detected, marked BAD, rolled back, its attackers
suspended, the alert fired, training going on from the GOOD model; a clean run; resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.config import parse_config
from shoal.coordinator.records import RunRecords
from shoal.core.settings import read_toml
from shoal.core.transforms import state_to_bytes
from shoal.registry import ClientRegistry, ClientStatus, ModelStatus
from shoal.simulation.runner import MODEL_NAME, Simulation, open_run_models
from shoal.telemetry.alerts import ModelRolledBack
from support import boosting_app
from support.boosting_app import ATTACKERS, POISONED_FROM, poisoned_job

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "poisoning.toml"


def rows_of(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def suspended_of(folder: Path) -> dict[str, str]:
    models = open_run_models(folder)
    try:
        clients = ClientRegistry(models.database).list()
    finally:
        models.database.close()
    return {
        c.client_id: c.status_reason or "" for c in clients if c.status is ClientStatus.SUSPENDED
    }


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One attacked run, with the engine's model and optimizer state seen after every round."""
    folder = tmp_path_factory.mktemp("poisoned")
    boosting_app.ALERTS.clear()
    simulation = Simulation(poisoned_job(), folder)
    engine: dict[int, tuple[np.ndarray, Any]] = {}

    def after(row: dict[str, Any]) -> None:
        coordinator = simulation.coordinator
        engine[row["round"]] = (coordinator.parameters.vector.copy(), coordinator.optimizer_state)

    summary = simulation.run(on_round=after)
    return {
        "folder": folder,
        "summary": summary,
        "rows": rows_of(folder),
        "engine": engine,
        "alerts": list(boosting_app.ALERTS),
    }


def first_bad(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return next(row for row in rows if (row.get("playbook") or {}).get("verdict") == "bad")


def test_the_poisoned_round_is_marked_bad_and_head_rolls_back(poisoned: dict[str, Any]) -> None:
    rows = poisoned["rows"]
    bad = first_bad(rows)
    assert bad["round"] == POISONED_FROM  # the attack's first round, not later
    assert all(row["playbook"]["verdict"] == "good" for row in rows if row["round"] < bad["round"])
    verdict = bad["playbook"]
    assert verdict["reasons"] and verdict["reasons"][0].startswith("accuracy_drop: ")
    good = verdict["rolled_back_to"]
    models = open_run_models(poisoned["folder"])
    try:
        record = models.get(MODEL_NAME, bad["model_version"])
        assert record.status is ModelStatus.BAD
        assert record.status_reason is not None and "accuracy_drop" in record.status_reason
        assert models.get(MODEL_NAME, good).status is ModelStatus.GOOD
        assert good == rows[bad["round"] - 2]["model_version"]  # the round before it
        after = next(row for row in rows if row["round"] == bad["round"] + 1)
        assert models.get(MODEL_NAME, after["model_version"]).parent == good  # a new branch
        head = models.head(MODEL_NAME)
        assert head is not None and head.status is ModelStatus.GOOD
        # the engine trains the next round from the GOOD model and its optimizer state, bit for bit
        vector, state = poisoned["engine"][bad["round"]]
        np.testing.assert_array_equal(vector, models.load(MODEL_NAME, good).vector)
        saved = models.load_state(MODEL_NAME, good)
        rollbacks = models.audit.entries(kind="rollback")
    finally:
        models.database.close()
    assert state_to_bytes(state) == saved
    assert rollbacks[0].details["reason"].startswith("playbook: ")


def test_the_attackers_of_the_round_are_suspended_and_the_alert_fired(
    poisoned: dict[str, Any],
) -> None:
    bad = first_bad(poisoned["rows"])
    suspended = suspended_of(poisoned["folder"])
    assert bad["playbook"]["suspended"] >= 1
    caught = {client for client, why in suspended.items() if f"round {bad['round']} " in why}
    assert len(caught) == bad["playbook"]["suspended"]
    assert caught <= set(ATTACKERS)  # the flagged ones: no honest client here
    assert set(suspended) <= set(ATTACKERS)
    alerts = [alert for alert in poisoned["alerts"] if isinstance(alert, ModelRolledBack)]
    assert alerts[0].version == bad["model_version"]
    assert alerts[0].rolled_back_to == bad["playbook"]["rolled_back_to"]
    assert alerts[0].suspended == len(caught)
    assert alerts[0].fields()["kind"] == "model_rolled_back"


def test_the_run_ends_on_a_good_model_and_the_summary_tallies(poisoned: dict[str, Any]) -> None:
    summary, rows = poisoned["summary"], poisoned["rows"]
    tally = summary["playbook"]
    assert tally["bad"] == tally["rolled_back"] >= 1
    assert tally["good"] + tally["bad"] == len(rows)
    head_row = next(row for row in rows if row["model_version"] == summary["model_version"])
    assert summary["final_accuracy"] == head_row["test_accuracy"]
    assert head_row["playbook"]["verdict"] == "good"


def test_a_clean_run_marks_every_version_good_and_never_rolls_back(tmp_path: Path) -> None:
    summary = Simulation(poisoned_job(attackers=()), tmp_path).run()
    rows = rows_of(tmp_path)
    assert [row["playbook"] for row in rows] == [{"verdict": "good", "reasons": []}] * len(rows)
    assert summary["playbook"] == {
        "good": 6,
        "bad": 0,
        "pending": 0,
        "rolled_back": 0,
        "suspended": 0,
    }
    assert suspended_of(tmp_path) == {}
    models = open_run_models(tmp_path)
    try:
        versions = models.list(MODEL_NAME)
    finally:
        models.database.close()
    assert [v.status for v in versions[1:]] == [ModelStatus.GOOD] * 6
    assert all(v.parent == v.version - 1 for v in versions[1:])


def test_with_the_playbook_off_the_poison_stays(tmp_path: Path) -> None:
    summary = Simulation(
        poisoned_job(rounds=POISONED_FROM, playbook={"enabled": False}), tmp_path
    ).run()
    assert "playbook" not in summary
    assert all("playbook" not in row for row in rows_of(tmp_path))
    assert summary["model_version"] == POISONED_FROM  # HEAD is the poisoned version


def test_a_resume_after_the_rollback_goes_on_from_the_good_version(tmp_path: Path) -> None:
    Simulation(poisoned_job(rounds=POISONED_FROM), tmp_path).run()  # stops right after the rollback
    rows = rows_of(tmp_path)
    bad = rows[-1]
    assert bad["round"] == POISONED_FROM and bad["playbook"]["verdict"] == "bad"
    (tmp_path / "metrics.jsonl").write_text(  # and the crash lost the rolled-back round's row
        "".join(json.dumps(row) + "\n" for row in rows[:-1])
    )
    summary = Simulation(poisoned_job(rounds=POISONED_FROM + 2), tmp_path, resume=True).run()
    resumed = rows_of(tmp_path)
    assert [row["round"] for row in resumed] == list(range(1, POISONED_FROM + 3))  # not replayed
    assert (
        resumed[POISONED_FROM - 1]["playbook"]["rolled_back_to"]
        == bad["playbook"]["rolled_back_to"]
    )
    models = open_run_models(tmp_path)
    try:
        nxt = models.get(MODEL_NAME, resumed[POISONED_FROM]["model_version"])
    finally:
        models.database.close()
    assert nxt.parent == bad["playbook"]["rolled_back_to"]
    assert summary["rounds_completed"] == POISONED_FROM + 2


class _Killed(BaseException):
    """The process dying at that very point (nothing after it runs, no handler catches it)."""


def test_a_crash_between_the_mark_and_the_rollback_is_completed_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies after the playbook marked the version BAD and before it rolled HEAD
    back (the test used to fake that state by moving HEAD back in SQL after the rollback, which
    a resume now refuses as a registry changed outside Shoal: no crash leaves a rollback entry
    whose HEAD move is undone)."""

    def killed(self: RunRecords, number: int, reason: str) -> None:
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(RunRecords, "rollback", killed)
        with pytest.raises(_Killed):
            Simulation(poisoned_job(rounds=POISONED_FROM), tmp_path).run()
    models = open_run_models(tmp_path)
    try:
        bad = models.head(MODEL_NAME)
        versions = models.list(MODEL_NAME)
    finally:
        models.database.close()
    assert bad is not None and bad.status is ModelStatus.BAD  # marked, HEAD still on it
    good = max(v.version for v in versions if v.status is ModelStatus.GOOD)
    Simulation(poisoned_job(rounds=POISONED_FROM + 1), tmp_path, resume=True).run()
    models = open_run_models(tmp_path)
    try:
        head = models.head(MODEL_NAME)
    finally:
        models.database.close()
    # the BAD version is left: HEAD is the GOOD one or trains on from it (the next round may be
    # caught too: an attacker the divergence measure did not flag in round 4 is in round 5)
    assert head is not None and good in (head.version, head.parent)
    assert head.version != bad.version
    assert [row["round"] for row in rows_of(tmp_path)] == list(range(1, POISONED_FROM + 2))


def test_the_example_attack_is_caught_with_the_attack_module(tmp_path: Path) -> None:
    """examples/poisoning.toml's [[attack]] (scaling, 20%) shortened: rolled back, suspended."""
    pytest.importorskip("shoal.simulation.attacks")
    from shoal.simulation.attacks import Attackers

    data = read_toml(EXAMPLE)
    data["run"]["rounds"] = 6
    data["data"]["num_clients"] = 20
    data["round"].update(clients_per_round=10, over_selection=1.0, quorum=0.5)
    data["client"]["epochs"] = 2
    data["simulation"]["workers"] = 0
    data["devices"] = {"classes": [{"name": "steady", "share": 1.0, "dropout": 0.0}]}
    data["attack"][0]["from_round"] = POISONED_FROM
    config = parse_config(data)
    summary = Simulation(config, tmp_path).run()
    assert summary["playbook"]["rolled_back"] >= 1
    attackers = Attackers(config, [f"client-{index:05d}" for index in range(20)])
    suspended = suspended_of(tmp_path)
    assert suspended and all(attackers.attack_of(client) for client in suspended)


def test_an_operators_bad_head_made_again_on_resume_is_never_committed(tmp_path: Path) -> None:
    """An operator marks HEAD BAD: the resume rolls back to its GOOD parent and plays its round
    again, on the same seeds and clients: the same weights, byte for byte, were committed as
    a new version, marked GOOD, and trained on."""
    Simulation(poisoned_job(attackers=(), rounds=3), tmp_path).run()
    models = open_run_models(tmp_path)
    try:
        head = models.head(MODEL_NAME)
        assert head is not None and head.version == 3
        models.mark(MODEL_NAME, 3, ModelStatus.BAD, reason="an operator's suspicion")
    finally:
        models.database.close()
    summary = Simulation(poisoned_job(attackers=(), rounds=4), tmp_path, resume=True).run()
    assert summary["stop_reason"] == (
        "round 3 made the weights of version 3, marked BAD (an operator's suspicion), again: "
        "suspend the clients behind it (shoal clients suspend) or change the job, then resume"
    )
    replayed = rows_of(tmp_path)[-1]
    assert replayed["round"] == 3 and not replayed["committed"]
    assert replayed["abort_reason"].startswith("made the weights of version 3")
    models = open_run_models(tmp_path)
    try:
        versions = models.list(MODEL_NAME)
        head = models.head(MODEL_NAME)
    finally:
        models.database.close()
    assert [v.version for v in versions] == [0, 1, 2, 3]  # nothing committed
    assert head is not None and head.version == 2  # the GOOD parent: round 4 never played
