"""A run's records, alike for both shells: one MLflow run across a resume, every figure, the end."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import parse_config
from shoal.coordinator.records import tracked_metrics
from shoal.coordinator.server import serve
from shoal.core.errors import RunError
from shoal.core.parameters import Parameters
from shoal.simulation import Simulation
from shoal.simulation.runner import MODEL_NAME, open_run_models
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.signing import generate_client_key
from support.jobs import bare_config, digits_client, network_job
from support.tracking_server import RUN_ID, TrackingServer, unset_http_settings

SMALL = [
    "data.num_clients=8",
    "round.clients_per_round=4",
    "round.over_selection=1.0",
    "evaluation.every=2",
    "evaluation.clients=4",
    "simulation.workers=0",
    "tracking.mlflow=true",
]


def test_every_number_of_a_row_is_tracked_and_evaluation_rows_have_their_own_names() -> None:
    fit = {"round": 3, "phase": "fit", "loss": 0.5, "epsilon": 1.0, "committed": True, "x": None}
    evaluate = {
        "round": 3,
        "phase": "evaluate",
        "model_version": 2,
        "loss": 0.25,
        "accuracy": 0.9,
        "fairness": {"phone": {"accuracy": 0.8, "participation_share": 0.5}},
        "drops_by_reason": {"failed:ValueError": 1},
    }
    assert tracked_metrics(fit) == {"loss": 0.5, "privacy_epsilon": 1.0, "committed": 1.0}
    assert tracked_metrics(evaluate) == {
        "evaluate_loss": 0.25,
        "evaluate_accuracy": 0.9,
        "evaluate_fairness.phone.accuracy": 0.8,
        "evaluate_fairness.phone.participation_share": 0.5,
        "evaluate_drops_by_reason.failed_ValueError": 1.0,
    }
    assert tracked_metrics({}) == {}


def mlflow_runs(folder: Path) -> tuple[Any, list[Any]]:
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiments = client.search_experiments()
    runs = [run for e in experiments for run in client.search_runs([e.experiment_id])]
    return client, runs


def artifact_paths(client: Any, run_id: str, folder: str | None = None) -> set[str]:
    return {artifact.path for artifact in client.list_artifacts(run_id, folder)}


def check_logged_model(client: Any, run: Any, run_folder: Path) -> int:
    """The model artifact loads back to HEAD's parameters, and its tags match HEAD; its version."""
    import safetensors.numpy

    models = open_run_models(run_folder)
    try:
        head = models.head(MODEL_NAME)
        assert head is not None
        parameters = models.load(MODEL_NAME, head.version)
    finally:
        models.database.close()
    run = client.get_run(run.info.run_id)  # the tags as they are now
    tags = run.data.tags
    assert tags["shoal.model.sha256"] == head.sha256
    assert tags["shoal.model.version"] == str(head.version)
    assert tags["shoal.model.layout"] == parameters.layout.to_json()
    folder = Path(client.download_artifacts(run.info.run_id, "model", str(run_folder / "dl")))
    data = (folder / "model.safetensors").read_bytes()
    tensors = safetensors.numpy.load(data)  # the safetensors package reads it as it is
    assert set(tensors) == set(parameters.layout.names)
    for name, view in parameters.views().items():
        np.testing.assert_array_equal(tensors[name], view)
    loaded = Parameters.from_bytes(data, expected_sha256=head.sha256)  # content sha256 checked
    np.testing.assert_array_equal(loaded.vector, parameters.vector)
    with safetensors.safe_open(folder / "model.safetensors", "numpy") as handle:
        metadata = handle.metadata()
    assert metadata["shoal.version"] == str(head.version)
    assert metadata["shoal.sha256"] == head.sha256
    assert (folder / "layout.json").read_text().strip() == parameters.layout.to_json()
    return head.version


def test_a_resumed_simulation_stays_one_mlflow_run_with_every_figure_and_the_final_model(
    tmp_path: Path,
) -> None:
    pytest.importorskip("mlflow")
    Simulation(bare_config([*SMALL, "run.rounds=2"]), tmp_path).run()
    client, [run] = mlflow_runs(tmp_path)
    run_id = run.info.run_id
    attached = artifact_paths(client, run_id)
    assert {"summary.json", "model"} <= attached
    assert ("report.html" in attached) == (tmp_path / "report.html").is_file()
    assert check_logged_model(client, run, tmp_path) == 2
    (tmp_path / "report.html").write_text("<!doctype html><title>run</title>\n")
    Simulation(bare_config([*SMALL, "run.rounds=4"]), tmp_path, resume=True).run()
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1  # the resume reopened the run it started
    [run] = runs
    assert run.info.status == "FINISHED"
    fit_steps = [point.step for point in client.get_metric_history(run_id, "loss")]
    assert fit_steps == [1, 2, 3, 4]
    evaluated = client.get_metric_history(run_id, "evaluate_loss")
    assert [point.step for point in evaluated] == [2, 4]  # evaluation rows too
    assert client.get_metric_history(run_id, "test_accuracy")
    # nested figures, flattened, at every round of their phase
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fit_rows = [row for row in rows if row["phase"] == "fit"]
    nested = client.get_metric_history(run_id, "divergence.l2_to_aggregate.p90")
    assert [(point.step, point.value) for point in nested] == [
        (row["round"], row["divergence"]["l2_to_aggregate"]["p90"]) for row in fit_rows
    ]
    committed = client.get_metric_history(run_id, "evaluate_committed")  # a boolean, as 1
    assert [(point.step, point.value) for point in committed] == [(2, 1.0), (4, 1.0)]
    # the end: the summary and the report as they are in the run folder, and HEAD's model
    downloaded = Path(client.download_artifacts(run_id, "", str(tmp_path / "all")))
    for name in ("summary.json", "report.html"):
        assert (downloaded / name).read_bytes() == (tmp_path / name).read_bytes()
    assert check_logged_model(client, run, tmp_path) == 4  # the later version took its place
    # artifacts that cannot be written: the MLflow run fails, the run itself is kept
    (tmp_path / "mlartifacts").rename(tmp_path / "moved")
    (tmp_path / "mlartifacts").write_text("a file where the artifacts folder goes\n")
    with pytest.raises(RunError, match="MLflow could not log an artifact at sqlite:///"):
        Simulation(bare_config([*SMALL, "run.rounds=5"]), tmp_path, resume=True).run()
    client, [run] = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"
    assert [p.step for p in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "summary.json").read_text())["rounds_completed"] == 5
    models = open_run_models(tmp_path)  # the registry was closed, and opens again
    try:
        assert models.head(MODEL_NAME).version == 5  # type: ignore[union-attr]
    finally:
        models.database.close()


@pytest.mark.timeout(120)
def test_a_tracking_server_that_goes_away_mid_run_costs_one_warning_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    unset_http_settings(monkeypatch)  # the tracker's own, undone after the test
    with TrackingServer() as server:

        def after_round(row: dict[str, Any]) -> None:
            if row["round"] == 1:
                server.go_away()

        config = bare_config([*SMALL, "run.rounds=3", f"tracking.tracking_uri={server.uri}"])
        with caplog.at_level(logging.WARNING, logger="shoal.coordinator.records"):
            summary = Simulation(config, tmp_path).run(on_round=after_round)
    # the run went on, every record of it kept: rows, summary, registry
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(row["round"], row["phase"]) for row in rows] == [
        (1, "fit"),
        (2, "fit"),
        (2, "evaluate"),
        (3, "fit"),
    ]
    assert summary["rounds_completed"] == 3
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    models = open_run_models(tmp_path)
    try:
        assert models.head(MODEL_NAME).version == 3  # type: ignore[union-attr]
    finally:
        models.database.close()
    # one warning of Shoal's (urllib3 logs its retries), at the first row the server missed;
    # no request after it
    [warning] = [record for record in caplog.records if record.name.startswith("shoal.")]
    message = warning.getMessage()
    assert message.startswith("MLflow tracking stops at round 2, the run goes on")
    assert f"MLflow could not log metrics at {server.uri}" in message and "\n" not in message
    assert {step for _, step, _ in server.metrics} == {1}
    assert "runs/update" not in server.calls  # nor an attempt to end the run
    assert (tmp_path / "mlflow-run-id").read_text().strip() == RUN_ID  # a resume reopens it


def test_a_coordinator_records_its_run_as_a_simulation_does(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    sections = network_job(
        tmp_path,
        run_id="served",
        token="t",
        clients=3,
        per_round=3,
        run={"rounds": 2, "name": "served"},
        evaluation={"every": 2, "clients": 3},
        tracking={"mlflow": True, "log_model": False},
    )
    config = parse_config(sections)
    rows: list[dict[str, Any]] = []

    async def main() -> None:
        runtimes, links, tasks = [], [], []

        def on_ready(port: int, first_round: int) -> None:
            for index in range(3):
                link = GrpcLink(f"127.0.0.1:{port}", credentials=None, enrollment_token="t")
                enrollment = load_or_create_enrollment(tmp_path / f"c{index}", generate_client_key)
                runtime = ClientRuntime(
                    digits_client(index, 3), link, enrollment, backoff=Backoff(0.01, 0.1)
                )
                links.append(link)
                runtimes.append(runtime)
                tasks.append(asyncio.create_task(runtime.run()))

        try:
            await asyncio.wait_for(
                serve(config, insecure=True, on_round=rows.append, on_ready=on_ready), 90
            )
        finally:
            for runtime in runtimes:
                runtime.stop()
            await asyncio.gather(*tasks)
            for link in links:
                await link.close()

    asyncio.run(main())
    state = Path(config.coordinator.state_dir)
    written = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert [(row["round"], row["phase"]) for row in written] == [
        (1, "fit"),
        (2, "fit"),
        (2, "evaluate"),
    ]
    assert written == rows  # what the CLI printed is what was recorded
    summary = json.loads((state / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["architecture"] == "softmax"
    assert summary["final_federated_accuracy"] is not None
    client, runs = mlflow_runs(state)
    [run] = runs
    assert run.info.status == "FINISHED" and run.info.run_name == "served"
    assert [p.step for p in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert [p.step for p in client.get_metric_history(run.info.run_id, "evaluate_loss")] == [2]
    # the coordinator's report goes with its summary; no model (log_model = false)
    assert artifact_paths(client, run.info.run_id) == {"summary.json", "report.html"}
    assert (state / "report.html").exists()
