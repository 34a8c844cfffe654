"""MLflow tracking against a real SQLite store: params once, rounds as steps, runs closed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.core import ConfigError, MissingExtraError, RunError
from shoal.core.parameters import Parameters
from shoal.telemetry import MlflowTracker
from shoal.telemetry.tracking import default_tracking_uri, flatten_params

# MLflow's SQL tracking store, when first imported, configures its ORM mappers with the
# `noload` strategy, which SQLAlchemy 2.1 deprecates: not ours to fix, and only that one.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:sqlalchemy.exc.SADeprecationWarning"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose MLflow store the tests share (creating a store takes seconds)."""
    pytest.importorskip("mlflow")
    return tmp_path_factory.mktemp("tracking")


def reader(tracker: MlflowTracker) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracker.tracking_uri)


def history(tracker: MlflowTracker, key: str) -> list[tuple[int, float]]:
    metrics = reader(tracker).get_metric_history(tracker.run_id, key)
    return sorted((metric.step, metric.value) for metric in metrics)


def test_three_rounds_are_read_back_as_steps(store: Path) -> None:
    with MlflowTracker(run_name="digits-fedavg", folder=store) as tracker:
        tracker.log_params({"rounds": 3, "strategy": {"name": "fedavg", "server_lr": 1.0}})
        tracker.log_round(1, loss=0.9, accuracy=0.6, epsilon=0.5, delta=1e-5)
        tracker.log_round(2, loss=0.7, epsilon=0.8, delta=1e-5, metrics={"bytes_up": 4096})
        tracker.log_round(3, loss=0.5, accuracy=0.8, epsilon=1.1, delta=1e-5)
    assert tracker.tracking_uri == default_tracking_uri(store)
    assert (store / "mlflow.db").is_file()
    assert history(tracker, "privacy_epsilon") == [(1, 0.5), (2, 0.8), (3, 1.1)]
    assert history(tracker, "privacy_delta") == [(1, 1e-5), (2, 1e-5), (3, 1e-5)]
    assert history(tracker, "loss") == [(1, 0.9), (2, 0.7), (3, 0.5)]
    assert history(tracker, "accuracy") == [(1, 0.6), (3, 0.8)]  # absent in round 2
    assert history(tracker, "bytes_up") == [(2, 4096.0)]
    run = reader(tracker).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "digits-fedavg"
    assert run.data.params == {
        "rounds": "3",
        "strategy.name": "fedavg",
        "strategy.server_lr": "1.0",
    }
    experiment = reader(tracker).get_experiment(tracker.experiment_id)
    assert experiment.name == "digits-fedavg"
    assert experiment.artifact_location == (store / "mlartifacts").resolve().as_uri()


def test_two_trackers_live_side_by_side(store: Path, tmp_path: Path) -> None:
    import mlflow

    uri_before = mlflow.get_tracking_uri()
    first = MlflowTracker(run_name="first", folder=store)
    second = MlflowTracker(run_name="second", folder=tmp_path / "elsewhere")
    third = MlflowTracker(
        run_name="third", tracking_uri=first.tracking_uri, experiment_name="first"
    )
    for round_number in (1, 2):
        first.log_round(round_number, epsilon=0.1 * round_number)
        second.log_round(round_number, epsilon=1.0 * round_number)
        third.log_round(round_number, epsilon=10.0 * round_number)
    assert mlflow.active_run() is None  # no fluent, process-wide run was started
    assert mlflow.get_tracking_uri() == uri_before
    for tracker in (first, second, third):
        tracker.end()
    assert second.tracking_uri != first.tracking_uri
    assert third.experiment_id == first.experiment_id
    assert len({first.run_id, second.run_id, third.run_id}) == 3
    assert history(first, "privacy_epsilon") == [(1, 0.1), (2, 0.2)]
    assert history(second, "privacy_epsilon") == [(1, 1.0), (2, 2.0)]
    assert history(third, "privacy_epsilon") == [(1, 10.0), (2, 20.0)]
    assert reader(second).get_run(second.run_id).info.status == "FINISHED"


class Crash(Exception):
    """A failure inside a tracked block."""


def crash_while_tracking(tracker: MlflowTracker) -> None:
    with tracker:
        tracker.log_round(0, loss=float("nan"))
        raise Crash


def test_a_failing_block_ends_the_run_failed_and_an_ended_run_logs_nothing(store: Path) -> None:
    tracker = MlflowTracker(run_name="crash", folder=store)
    with pytest.raises(Crash):
        crash_while_tracking(tracker)
    assert reader(tracker).get_run(tracker.run_id).info.status == "FAILED"
    assert history(tracker, "loss")[0][0] == 0  # NaN is logged as NaN
    tracker.end()  # a second end changes nothing
    assert reader(tracker).get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(RunError, match=r"has ended \(FAILED\)"):
        tracker.log_round(1, loss=0.5)
    with pytest.raises(RunError, match="has ended"):
        tracker.log_params({"x": 1})


def test_parameters_are_logged_once(store: Path) -> None:
    with MlflowTracker(run_name="params", folder=store) as tracker:
        many = {f"p{i:03d}": i for i in range(250)}  # more than one MLflow batch
        tracker.log_params(many)
        tracker.log_params({"p000": 0, "extra": "x"})  # the same value again, and a new one
        with pytest.raises(ConfigError, match=r"cannot change once logged: \['p001'\]"):
            tracker.log_params({"p001": 2})
        tracker.log_params({})
    params = reader(tracker).get_run(tracker.run_id).data.params
    assert len(params) == 251
    assert (params["p001"], params["extra"]) == ("1", "x")


def test_bad_rounds_and_metrics_are_config_errors(store: Path) -> None:
    with MlflowTracker(run_name="bad-input", folder=store) as tracker:
        with pytest.raises(ConfigError, match="round must be an integer >= 0, got -1"):
            tracker.log_round(-1, loss=0.5)
        with pytest.raises(ConfigError, match="metric 'phase' must be a number, got 'fit'"):
            tracker.log_round(1, metrics={"phase": "fit"})  # type: ignore[dict-item]
        with pytest.raises(ConfigError, match="metric 'loss' is given twice"):
            tracker.log_round(1, loss=0.5, metrics={"loss": 0.4})
        tracker.log_round(1)  # nothing to log is fine
    assert reader(tracker).get_run(tracker.run_id).data.metrics == {}


def test_times_given_to_mlflow_are_floored_to_the_granularity(store: Path) -> None:
    hour_ms = 3_600_000
    with MlflowTracker(run_name="coarse", folder=store, timestamp_granularity_s=3600) as tracker:
        tracker.log_round(1, loss=0.5)
    metrics = reader(tracker).get_metric_history(tracker.run_id, "loss")
    info = reader(tracker).get_run(tracker.run_id).info
    times = [metric.timestamp for metric in metrics] + [info.start_time, info.end_time]
    assert all(moment % hour_ms == 0 for moment in times), times
    with pytest.raises(ConfigError, match="at least 1 s"):
        MlflowTracker(run_name="coarse", folder=store, timestamp_granularity_s=0)


def test_a_model_is_attached_as_safetensors_and_tagged(store: Path, tmp_path: Path) -> None:
    import safetensors.numpy

    small = Parameters.from_arrays([np.arange(6.0).reshape(2, 3), np.ones(3)], names=["w", "b"])
    many = Parameters.from_arrays([np.zeros(1)] * 400, names=[f"layer{i:03d}" for i in range(400)])
    with MlflowTracker(run_name="models", folder=store) as tracker:
        tags = tracker.log_model(small, name="net", version=3, details={"round": "5"})
        file = tmp_path / "small"
        reader(tracker).download_artifacts(tracker.run_id, "model", str(file))
        data = (file / "model" / "model.safetensors").read_bytes()
        loaded = Parameters.from_bytes(data, expected_sha256=small.sha256())  # checks the sha256
        np.testing.assert_array_equal(loaded.vector, small.vector)
        np.testing.assert_array_equal(safetensors.numpy.load(data)["w"], small.views()["w"])
        tracker.log_model(many, name="net", version=4, details={})  # replaces the first
        tracker.log_artifact(Path(__file__), folder="code")
    run = reader(tracker).get_run(tracker.run_id)
    assert tags["shoal.model.round"] == "5" and tags["shoal.model.file_sha256"]
    assert run.data.tags["shoal.model.version"] == "4"
    assert run.data.tags["shoal.model.sha256"] == many.sha256()
    assert run.data.tags["shoal.model.tensors"] == "400"
    assert run.data.tags["shoal.model.layout"].startswith("too long for a tag")  # 400 tensors
    listed = {a.path for a in reader(tracker).list_artifacts(tracker.run_id, "model")}
    assert listed == {"model/model.safetensors", "model/layout.json"}
    with pytest.raises(RunError, match="has ended"):
        tracker.log_model(small, name="net", version=5, details={})


def test_flatten_params() -> None:
    assert flatten_params({}) == {}
    assert flatten_params({"a": {"b": {"c": None}}, "d": [1, 2], "e": True}) == {
        "a.b.c": "None",
        "d": "[1, 2]",
        "e": "True",
    }
    assert len(flatten_params({"long": "x" * 10_000})["long"]) == 6000


def test_a_run_name_and_a_store_are_needed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a run name"):
        MlflowTracker(run_name="", folder=tmp_path)
    with pytest.raises(ConfigError, match="needs a tracking URI or a run folder"):
        MlflowTracker(run_name="x")


def test_without_mlflow_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(
        MissingExtraError, match=r"MLflow tracking needs .*pip install 'shoal\[mlflow\]'"
    ):
        MlflowTracker(run_name="x", folder=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was created


def test_importing_telemetry_does_not_import_mlflow() -> None:
    code = "import sys, shoal.telemetry; sys.exit('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
