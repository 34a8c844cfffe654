"""A user's own apps in a simulation: named next to the config, or given as objects by a script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.client.app import ClientContext, load_client_app
from shoal.core import ConfigError
from shoal.core.parameters import Parameters

APP = '''
import numpy as np
from shoal.client.api import Client, EvaluateResult, FitResult
from shoal.core.parameters import Parameters
from shoal.coordinator.app import ServerApp, weighted_mean_of


class Constant(Client):
    """Moves every weight towards its partition index; reports a custom metric."""

    def __init__(self, index: int) -> None:
        self.index = index

    def get_parameters(self) -> Parameters:
        return Parameters.from_arrays([np.zeros(4, np.float32)])

    def fit(self, parameters, config):
        target = np.full(4, float(self.index), np.float32)
        learning_rate = config.learning_rate
        moved = parameters.vector + learning_rate * (target - parameters.vector)
        metrics = {"tag_length": float(len(str(config.extras.get("tag", ""))))}
        return FitResult(parameters.with_vector(moved), self.index + 1, metrics)

    def evaluate(self, parameters, config):
        return EvaluateResult(float(np.abs(parameters.vector).mean()), 1, {"accuracy": 0.5})


def client_fn(context):
    return Constant(context.partition_index)


server_app = ServerApp(
    fit_config=lambda r: {"learning_rate": 0.5, "tag": "x" * r},
    fit_metrics=weighted_mean_of("tag_length"),
    evaluate=lambda parameters, r: {"loss": float(parameters.vector.sum()), "accuracy": 0.9},
    architecture="constant-v1",
)
'''

JOB = """
[run]
name = "byo"
rounds = 3
[data]
num_clients = 4
[round]
clients_per_round = 4
over_selection = 1.0
[evaluation]
every = 0
[simulation]
workers = {workers}
[app]
client = "constant_app:client_fn"
server = "constant_app:server_app"
"""


def python(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """This Python in ``cwd`` without PYTHONPATH: only the folders Shoal adds can be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def shoal(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return python("-m", "shoal", *args, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_an_app_next_to_the_config_runs_without_pythonpath(tmp_path: Path, workers: int) -> None:
    job = tmp_path / "project"
    job.mkdir()
    (job / "constant_app.py").write_text(APP)
    (job / "job.toml").write_text(JOB.format(workers=workers))
    out = tmp_path / "run"
    # run from elsewhere: only the config's folder makes the module importable
    result = shoal("simulate", str(job / "job.toml"), "--out", str(out), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert [row["tag_length"] for row in rows] == [1.0, 2.0, 3.0]  # the app's round config
    assert all(row["test_accuracy"] == 0.9 for row in rows)  # the app's central evaluation
    summary = json.loads((out / "summary.json").read_text())
    assert summary["architecture"] == "constant-v1"
    assert summary["rounds_completed"] == 3


SCRIPT = """
import numpy as np
import shoal
from shoal.client.api import Client, EvaluateResult, FitResult
from shoal.core.parameters import Parameters


class Local(Client):
    def __init__(self, index):
        self.index = index

    def get_parameters(self):
        return Parameters.from_arrays([np.zeros(2, np.float32)])

    def fit(self, parameters, config):
        return FitResult(parameters.with_vector(parameters.vector + 1), 1, {})

    def evaluate(self, parameters, config):
        return EvaluateResult(0.0, 1, {})


result = shoal.simulate(
    {"run": {"rounds": 2}, "data": {"num_clients": 3}, "round": {"clients_per_round": 3,
     "over_selection": 1.0}, "evaluation": {"every": 0}, "simulation": {"workers": WORKERS}},
    client_app=lambda context: Local(context.partition_index),
    out=OUT,
)
print(result.summary["rounds_completed"], result.parameters.vector.tolist(), len(result.rows))
"""


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_script_on_stdin_simulates_its_own_classes(tmp_path: Path, workers: int) -> None:
    script = SCRIPT.replace("WORKERS", str(workers)).replace("OUT", repr(str(tmp_path / "r")))
    result = python("-", stdin=textwrap.dedent(script), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "2 [2.0, 2.0] 2"


def test_an_unimportable_app_is_one_line_naming_module_and_search_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_client_app("no_such_app_module:client_fn", search_path=[tmp_path])
    message = str(error.value)
    assert "no_such_app_module" in message and str(tmp_path.resolve()) in message
    assert "\n" not in message


def test_an_app_that_is_not_there_or_returns_no_client_is_refused(tmp_path: Path) -> None:
    (tmp_path / "half_app.py").write_text("def client_fn(context):\n    return 42\n")
    with pytest.raises(ConfigError, match="has no 'missing'"):
        load_client_app("half_app:missing", search_path=[tmp_path])
    app = load_client_app("half_app:client_fn", search_path=[tmp_path])
    with pytest.raises(ConfigError, match="not a shoal Client"):
        app(None)  # type: ignore[arg-type]


BROKEN = """
def client_fn(context):
    raise ValueError(f"no data file for client {context.partition_index}")
"""


def test_why_clients_fail_is_in_each_row_and_under_each_round(tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text(BROKEN)
    job = JOB.format(workers=0).replace("constant_app:client_fn", "broken_app:client_fn")
    job = job.replace(
        'server = "constant_app:server_app"', 'server = "shoal.apps.builtin:server_app"'
    )
    (tmp_path / "job.toml").write_text(job)
    result = shoal("simulate", "job.toml", "--out", "run", "--rounds", "1", cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # nothing trained: it exited 0
    assert "failed: 1 x ValueError: no data file for client 2" in result.stdout
    said = result.stderr.strip().splitlines()[-1]
    assert said.startswith("error: no fit round committed, 1 aborted: 1 x 0 of 4 reported")
    assert "; clients failed: 1 x ValueError: no data file for client" in said
    [row] = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert row["failures"] == {f"ValueError: no data file for client {i}": 1 for i in range(4)}
    assert not row["committed"]


def test_a_failing_app_is_one_clear_error_not_a_traceback(tmp_path: Path) -> None:
    from shoal.core import RunError
    from shoal.simulation import Simulation
    from support.jobs import bare_config

    config = bare_config(["data.num_clients=4", "round.clients_per_round=2", "run.rounds=1"])

    def exploding_factory(context: object) -> object:
        raise RuntimeError("boom")

    with pytest.raises(ConfigError, match="failed: RuntimeError: boom"):
        Simulation(config, tmp_path / "a", server_app=exploding_factory)

    def no_client(context: object) -> object:
        raise KeyError("no data")

    simulation = Simulation(config, tmp_path / "b", client_app=no_client)
    with pytest.raises(RunError, match="the first client raised KeyError"):
        simulation.run()


class Shifting(Client):
    """A model of its own shape (3 values), which the built-in app cannot train."""

    def get_parameters(self) -> Parameters:
        return Parameters.from_arrays([np.zeros(3, np.float32)])

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        return FitResult(parameters.with_vector(parameters.vector + 1), 1, {})

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return EvaluateResult(0.0, 1, {})


def shifting(context: ClientContext) -> Client:
    return Shifting()


def test_a_run_of_apps_given_as_objects_goes_on_only_with_them(tmp_path: Path) -> None:
    """Apps given to ``shoal.simulate`` are not in the job it stores, so ``shoal simulate
    --resume`` and ``shoal unlearn`` took the job's (the built-in app): every round failed on
    the user's model (exit 0), and the unlearning first rolled HEAD back to version 0 and
    marked every later version BAD. ``shoal.simulate(out=RUN, resume=True)`` went on with the
    embedded default job, not the run's."""
    from shoal import simulate
    from shoal.simulation.runner import MODEL_NAME, open_run_models

    job = {
        "run": {"rounds": 2},
        "data": {"num_clients": 3},
        "round": {"clients_per_round": 3, "over_selection": 1.0},
        "evaluation": {"every": 0},
        "simulation": {"workers": 0},
    }
    run = tmp_path / "run"
    simulate(job, client_app=shifting, out=run)

    def versions() -> list[tuple[int, str]]:
        models = open_run_models(run)
        try:
            head = models.head(MODEL_NAME)
            listed = [(record.version, record.status.value) for record in models.list(MODEL_NAME)]
            return [*listed, (-1 if head is None else head.version, "head")]
        finally:
            models.database.close()

    before = versions()
    with pytest.raises(ConfigError) as refused:
        simulate(out=run, resume=True, rounds=3)
    message = str(refused.value)
    assert "test_apps:shifting" in message and "resume=True, client_app=" in message
    resumed = shoal("simulate", "--resume", str(run), "--rounds", "3", cwd=tmp_path)
    assert resumed.returncode == 2, resumed.stdout + resumed.stderr
    assert "holds a run of the app" in resumed.stderr
    unlearned = shoal("unlearn", "client-00001", "--out", str(run), cwd=tmp_path)
    assert unlearned.returncode == 2, unlearned.stdout + unlearned.stderr
    assert versions() == before  # nothing rolled back, nothing marked
    result = simulate(out=run, resume=True, rounds=3, client_app=shifting)
    assert result.summary["rounds_completed"] == 3
    assert result.summary["clients"] == 3  # the run's own job: it went on with the default's 100
    assert result.parameters.vector.tolist() == [3.0, 3.0, 3.0]


UNGUARDED = """
import shoal
from shoal.apps.builtin import client_app

shoal.simulate(
    {"run": {"rounds": 1}, "data": {"num_clients": 4}, "round": {"clients_per_round": 4},
     "simulation": {"workers": 2}},
    client_app=client_app,
    out="run",
)
"""


@pytest.mark.slow
def test_a_script_without_a_main_guard_is_told_to_add_one(tmp_path: Path) -> None:
    """Each worker imports the script, which started the simulation again there: the worker
    died on the run folder's lock and the run stopped with "rerun with workers = 0"."""
    (tmp_path / "train.py").write_text(UNGUARDED)
    result = python("train.py", cwd=tmp_path)
    assert result.returncode != 0
    assert "each worker imports train.py" in result.stderr.splitlines()[-1], result.stderr[-3000:]
    assert 'if __name__ == "__main__":' in result.stderr.splitlines()[-1]


def test_a_server_apps_central_evaluation_follows_the_jobs_switch(tmp_path: Path) -> None:
    """``evaluation.centralized = false`` was read by the built-in app alone: a user's server
    app was still asked to evaluate every version."""
    from shoal import ServerApp, simulate

    asked: list[int] = []

    def evaluate(parameters: Parameters, round_number: int) -> dict[str, float]:
        asked.append(round_number)
        return {"loss": 1.0, "accuracy": 0.5}

    job = {
        "run": {"rounds": 2},
        "data": {"num_clients": 3},
        "round": {"clients_per_round": 3, "over_selection": 1.0},
        "evaluation": {"every": 0, "centralized": False},
        "simulation": {"workers": 0},
    }
    server = ServerApp(evaluate=evaluate, architecture="shifting-v1")
    result = simulate(job, client_app=shifting, server_app=server, out=tmp_path / "off")
    assert asked == [] and result.summary["final_accuracy"] is None
    job["evaluation"]["centralized"] = True
    result = simulate(job, client_app=shifting, server_app=server, out=tmp_path / "on")
    assert asked == [1, 2]  # each committed version
    assert result.summary["final_accuracy"] == 0.5
