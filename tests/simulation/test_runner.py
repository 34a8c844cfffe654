"""The simulator end to end: determinism, resume, quorum, failures, outputs."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.aggregation import drift as drift_module
from shoal.apps import builtin
from shoal.client.api import Client
from shoal.client.app import ClientApp, ClientContext
from shoal.config import Config
from shoal.core import RunError
from shoal.governance import policy as governance_policy
from shoal.registry import ClientRegistry, ClientStatus
from shoal.simulation.runner import (
    MODEL_NAME,
    Simulation,
    final_parameters,
    load_run_config,
    open_run_models,
)
from support.jobs import bare_config, rows_without_wall
from support.whereabouts import DRIFTS_MEASURED, counted_drift_of_gram

DESIGN_ROW_KEYS = {
    "round", "phase", "selected", "reported", "dropped", "loss", "accuracy", "virtual_time_s",
    "wall_time_s", "model_version", "bytes_up", "bytes_down",
}  # fmt: skip
DESIGN_SUMMARY_KEYS = {
    "rounds_completed", "final_accuracy", "final_loss", "wall_time_s", "virtual_time_s",
    "num_parameters", "bytes_up", "bytes_down",
}  # fmt: skip


def small(*overrides: str) -> Config:
    base = [
        "run.rounds=4",
        "data.num_clients=20",
        "round.clients_per_round=5",
        "round.deadline_s=20",
        "evaluation.every=2",
        "evaluation.clients=4",
        "simulation.workers=0",
        "devices.classes=[{name='a', share=1.0, examples_per_second=10, dropout=0.15, "
        "availability=0.9}]",
    ]
    return bare_config([*base, *overrides])


def test_run_writes_the_design_outputs(tmp_path: Path) -> None:
    summary = Simulation(small(), tmp_path).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(row["round"], row["phase"]) for row in rows] == [
        (1, "fit"), (2, "fit"), (2, "evaluate"), (3, "fit"), (4, "fit"), (4, "evaluate"),
    ]  # fmt: skip
    for row in rows:
        assert row.keys() >= DESIGN_ROW_KEYS
    assert summary.keys() >= DESIGN_SUMMARY_KEYS
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["num_parameters"] == 650
    assert summary["bytes_up"] == sum(row["bytes_up"] for row in rows) > 0
    assert load_run_config(tmp_path) == small()
    assert final_parameters(tmp_path).sha256() == summary["model_sha256"]


def test_same_seed_same_run_whatever_the_workers(tmp_path: Path) -> None:
    Simulation(small(), tmp_path / "serial").run()
    Simulation(small(), tmp_path / "again").run()
    Simulation(small("simulation.workers=2"), tmp_path / "pool").run()
    Simulation(small("run.seed=1"), tmp_path / "other").run()
    reference = rows_without_wall(tmp_path / "serial")
    assert rows_without_wall(tmp_path / "again") == reference
    assert rows_without_wall(tmp_path / "pool") == reference
    assert rows_without_wall(tmp_path / "other") != reference


def test_a_pool_measures_the_drift_in_a_worker_and_the_run_is_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the drift's work past the updates' Gram matrix goes to the pool's idle worker: none of
    # it in this process, and every row and projection as one process makes them
    monkeypatch.setattr(drift_module, "drift_of_gram", counted_drift_of_gram)
    DRIFTS_MEASURED.clear()
    Simulation(small(), tmp_path / "serial").run()
    in_one_process = len(DRIFTS_MEASURED)
    Simulation(small("simulation.workers=2"), tmp_path / "pool").run()
    assert in_one_process == 4 and len(DRIFTS_MEASURED) == in_one_process  # a fit round's each
    assert rows_without_wall(tmp_path / "pool") == rows_without_wall(tmp_path / "serial")
    pooled, serial = (projections(tmp_path / name) for name in ("pool", "serial"))
    assert pooled == serial and len(serial) == 4


def projections(folder: Path) -> list[dict[str, Any]]:
    """The run's drift projections, without the clients' names (each run's own pseudonyms)."""
    records = [json.loads(line) for line in (folder / "drift.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key != "clients"} for record in records]


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    Simulation(small("run.rounds=6"), tmp_path / "whole").run()
    Simulation(small("run.rounds=3"), tmp_path / "parts").run()
    Simulation(small("run.rounds=6"), tmp_path / "parts", resume=True).run()
    assert rows_without_wall(tmp_path / "parts") == rows_without_wall(tmp_path / "whole")
    assert (
        final_parameters(tmp_path / "parts").sha256()
        == final_parameters(tmp_path / "whole").sha256()
    )


def test_resume_after_a_crash_mid_run(tmp_path: Path) -> None:
    Simulation(small("run.rounds=6"), tmp_path / "whole").run()

    def crash(row: dict[str, Any]) -> None:
        if row["round"] == 4 and row["phase"] == "evaluate":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Simulation(small("run.rounds=6"), tmp_path / "crashed").run(on_round=crash)
    Simulation(small("run.rounds=6"), tmp_path / "crashed", resume=True).run()
    assert rows_without_wall(tmp_path / "crashed") == rows_without_wall(tmp_path / "whole")


def test_a_started_run_is_not_overwritten(tmp_path: Path) -> None:
    Simulation(small("run.rounds=1"), tmp_path).run()
    with pytest.raises(RunError, match="already holds a run"):
        Simulation(small("run.rounds=1"), tmp_path).run()
    with pytest.raises(RunError, match="no committed version"):
        Simulation(small(), tmp_path / "empty", resume=True).run()


def test_rounds_below_quorum_abort_and_keep_the_model(tmp_path: Path) -> None:
    config = small(
        "round.quorum=1.0",
        "round.over_selection=1.0",
        'devices.classes=[{name="flaky", share=1.0, dropout=0.5}]',
        # no re-selection: replacements would rescue a round by luck of the draw
        'round.drop_fallback="none"',
    )
    Simulation(config, tmp_path).run()
    rows = [row for row in rows_without_wall(tmp_path) if row["phase"] == "fit"]
    aborted = [row for row in rows if not row["committed"]]
    assert aborted, "with half the fleet dropping and a full quorum some round must abort"
    for row in aborted:
        assert "quorum" in row["abort_reason"]
        previous = [r for r in rows if r["round"] < row["round"]]
        expected = previous[-1]["model_version"] if previous else 0
        assert row["model_version"] == expected


def flaky_client(context: ClientContext) -> Client:
    """Client 3 raises on every fit: a failure of that client, never of the run."""
    client = builtin.client_app(context)
    if context.client_id == "client-00003":

        def broken(*args: object) -> Any:
            raise MemoryError("device out of memory")

        client.fit = broken  # type: ignore[method-assign]
    return client


def test_a_client_that_raises_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    config = small(
        "run.rounds=6", "round.clients_per_round=19", "round.over_selection=1.0", "round.quorum=0.5"
    )
    app = ClientApp(flaky_client, num_examples=builtin.client_app.num_examples)
    summary = Simulation(config, tmp_path, client_app=app, server_app=builtin.server_app).run()
    assert summary["rounds_completed"] == 6
    rows = [row for row in rows_without_wall(tmp_path) if row["phase"] == "fit"]
    assert all(row["reported"] < row["selected"] for row in rows)


def test_partial_work_is_aggregated_and_dropped_work_is_not(tmp_path: Path) -> None:
    common = [
        "devices.straggler_fraction=0.5",
        "round.over_selection=1.0",
        "round.quorum=0.2",
        "run.rounds=2",
    ]
    Simulation(small(*common, "devices.straggler_policy=partial"), tmp_path / "partial").run()
    Simulation(small(*common, "devices.straggler_policy=drop"), tmp_path / "drop").run()
    partial = [row for row in rows_without_wall(tmp_path / "partial") if row["phase"] == "fit"]
    drop = [row for row in rows_without_wall(tmp_path / "drop") if row["phase"] == "fit"]
    assert sum(row["partial"] for row in partial) > 0 and sum(row["partial"] for row in drop) == 0
    assert sum(row["reported"] for row in partial) > sum(row["reported"] for row in drop)


def test_model_is_saved_every_committed_round(tmp_path: Path) -> None:
    Simulation(small(), tmp_path).run()
    models = open_run_models(tmp_path)
    versions = models.list(MODEL_NAME)
    assert all(models.load_state(MODEL_NAME, record.version) for record in versions)
    models.database.close()
    rows = [
        row for row in rows_without_wall(tmp_path) if row["phase"] == "fit" and row["committed"]
    ]
    assert len(versions) == len(rows) + 1  # plus the initial model, version 0
    assert np.isfinite(final_parameters(tmp_path).vector).all()


def test_resume_recovers_a_row_lost_between_commit_and_log(tmp_path: Path) -> None:
    Simulation(small("run.rounds=6"), tmp_path / "whole").run()
    Simulation(small("run.rounds=3"), tmp_path / "parts").run()
    metrics = tmp_path / "parts" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["round"] == 3
    metrics.write_text("".join(lines[:-1]) + lines[-1][:20])  # the last row, torn mid-write
    Simulation(small("run.rounds=6"), tmp_path / "parts", resume=True).run()
    assert rows_without_wall(tmp_path / "parts") == rows_without_wall(tmp_path / "whole")


def test_rollback_then_resume_branches_from_the_good_version(tmp_path: Path) -> None:
    Simulation(small("run.rounds=4"), tmp_path).run()
    models = open_run_models(tmp_path)
    good = next(record for record in models.list(MODEL_NAME) if record.round == 2)
    before = models.list(MODEL_NAME)
    models.rollback(MODEL_NAME, good.version)
    models.database.close()
    Simulation(small("run.rounds=4"), tmp_path, resume=True).run()
    rows = rows_without_wall(tmp_path)
    assert [(row["round"], row["phase"]) for row in rows][-3:] == [
        (3, "fit"),
        (4, "fit"),
        (4, "evaluate"),
    ]
    models = open_run_models(tmp_path)
    after = models.list(MODEL_NAME)
    models.database.close()
    new = after[len(before) :]
    assert new and new[0].parent == good.version
    assert after[: len(before)] == before  # nothing was deleted: the bad branch stays for audit


def test_the_run_enrolls_its_fleet_and_suspended_clients_are_never_selected(tmp_path: Path) -> None:
    Simulation(small("run.rounds=2"), tmp_path).run()
    models = open_run_models(tmp_path)
    clients = ClientRegistry(models.database)
    assert clients.count() == 20
    for record in clients.list(limit=100)[:17]:  # ban most of the fleet, as after a poisoning
        clients.set_status(record.client_id, ClientStatus.SUSPENDED, "poisoned round 2")
    models.database.close()
    Simulation(small("run.rounds=4"), tmp_path, resume=True).run()
    fits = [row for row in rows_without_wall(tmp_path) if row["phase"] == "fit"]
    later = [row for row in fits if row["round"] > 2]
    assert later and all(not row["committed"] for row in later)
    assert all("eligible clients" in row["abort_reason"] for row in later)
    assert all(row["selected"] <= 3 for row in later)


def test_clients_suspended_from_another_connection_during_a_run_are_barred_at_once(
    tmp_path: Path,
) -> None:
    # the run keeps its reads of the barred clients and of their profiles between changes:
    # an operator's suspension, committed through another connection while the run goes on,
    # must bar them from the very next round
    def after_round(row: dict[str, Any]) -> None:
        if row["round"] != 2:
            return
        models = open_run_models(tmp_path)
        try:
            clients = ClientRegistry(models.database)
            for record in clients.list(limit=100)[:17]:
                clients.set_status(record.client_id, ClientStatus.SUSPENDED, "poisoned round 2")
        finally:
            models.database.close()

    Simulation(small("run.rounds=4"), tmp_path).run(on_round=after_round)
    fits = [row for row in rows_without_wall(tmp_path) if row["phase"] == "fit"]
    assert all(row["committed"] for row in fits if row["round"] <= 2)
    later = [row for row in fits if row["round"] > 2]
    assert later and all(not row["committed"] for row in later)
    assert all("eligible clients" in row["abort_reason"] for row in later)


def test_the_policys_query_thread_ends_with_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as a slow policy's queries go: beside the round's work, on the engine's thread
    monkeypatch.setattr(governance_policy, "_ALONE_BELOW_S", 0.0)

    def policy_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("shoal-policy")]

    seen: list[list[str]] = []
    simulation = Simulation(small("policy.enabled=true"), tmp_path)
    simulation.run(on_round=lambda row: seen.append(policy_threads()))
    assert any(seen)  # the query ran beside the round's work, on the engine's thread
    assert policy_threads() == []
