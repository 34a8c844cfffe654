"""What a reviewer found walking the README's operator commands, each fixed and kept fixed."""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.config import parse_config
from shoal.core import Parameters
from shoal.registry import BlobStore, ModelRegistry, ModelStatus, open_database
from shoal.registry.participation import Participation, ParticipationLog
from shoal.simulation.runner import Simulation

ROOT = Path(__file__).resolve().parents[2]
NAME = "listed"
SMALL: dict[str, Any] = {
    "run": {"name": NAME, "rounds": 2},
    "data": {"num_clients": 6},
    "round": {"clients_per_round": 3, "over_selection": 1.0, "deadline_s": 600.0},
    "evaluation": {"every": 0},
    "simulation": {"workers": 0},
}
SMALL_SETS = [
    "--set", f"run.name='{NAME}'",
    "--set", "run.rounds=1",
    "--set", "data.num_clients=6",
    "--set", "round.clients_per_round=3",
    "--set", "evaluation.every=0",
    "--set", "simulation.workers=0",
    "--set", "round.deadline_s=600.0",
]  # fmt: skip
HEADER = re.compile(r"^\s*round\s+phase\s+sel\s+rep", re.MULTILINE)


def shoal(*args: str | Path, columns: int = 200) -> Result:
    return CliRunner(env={"COLUMNS": str(columns)}).invoke(app, [str(arg) for arg in args])


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-round simulated run named ``listed``, in a folder of its own."""
    folder = tmp_path_factory.mktemp("fixes") / "run"
    Simulation(parse_config(SMALL), folder).run()
    return folder


def registry_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'registry' / 'registry.db'}"


@pytest.fixture
def shared(run: Path, tmp_path: Path) -> Path:
    """A copy of the run whose registry holds a second run, ``another``, as a shared
    registry does: round 7 with two participants, one of them flagged."""
    copy = tmp_path / "shared"
    shutil.copytree(run, copy)
    database = open_database(registry_url(copy))
    try:
        ParticipationLog(database).record(
            [
                Participation(run_id="another", round=7, participant="p-a", model_version=3),
                Participation(
                    run_id="another", round=7, participant="p-b", model_version=3, flagged=True
                ),
            ]
        )
    finally:
        database.close()
    return copy


# --- rounds list takes --registry and --run-id, as rounds show does ----------------------


def test_rounds_list_reads_a_registry_url_for_a_run_named_by_id(run: Path, tmp_path: Path) -> None:
    """`shoal rounds list --registry URL` was "No such option": a shared registry's runs had
    no list of their rounds."""
    rows = as_json(
        shoal("rounds", "list", "--registry", registry_url(run), "--run-id", NAME,
              "--state-dir", tmp_path / "elsewhere", "--json")
    )  # fmt: skip
    assert [row["round"] for row in rows] == [1, 2]
    assert all(row["participants"] == 3 and row["committed"] for row in rows)
    assert [row["model_version"] for row in rows] == [1, 2]


def test_rounds_list_of_the_folders_own_run_gives_its_metrics_rows(run: Path) -> None:
    own = as_json(shoal("rounds", "list", "--state-dir", run, "--run-id", NAME, "--json"))
    assert own == as_json(shoal("rounds", "list", "--state-dir", run, "--json"))
    assert [(row["round"], row["phase"]) for row in own] == [(1, "fit"), (2, "fit")]


def test_rounds_list_of_a_run_with_no_rounds_names_the_folders_own_run(run: Path) -> None:
    result = shoal("rounds", "list", "--state-dir", run, "--run-id", "run-1")
    assert result.exit_code == 1
    assert "run 'run-1' has no rounds on record" in result.stderr
    assert f"this folder's run is '{NAME}'" in result.stderr


def test_rounds_list_of_another_run_in_the_registry_gives_its_rounds(shared: Path) -> None:
    rows = as_json(shoal("rounds", "list", "--state-dir", shared, "--run-id", "another", "--json"))
    assert rows == [
        {
            "round": 7,
            "committed": True,
            "model_version": 3,
            "participants": 2,
            "flagged": 1,
            "denied": 0,
        }
    ]
    table = shoal("rounds", "list", "--state-dir", shared, "--run-id", "another")
    assert table.exit_code == 0, table.output
    assert "rounds of run another" in table.stdout


def test_rounds_list_of_a_registry_with_several_runs_asks_for_a_run_id(
    shared: Path, tmp_path: Path
) -> None:
    url = registry_url(shared)
    result = shoal("rounds", "list", "--registry", url, "--state-dir", tmp_path / "elsewhere")
    assert result.exit_code == 2
    assert f"give --run-id: the registry holds rounds of runs another, {NAME}" in result.stderr


def test_rounds_show_of_a_run_in_a_registry_url_needs_no_run_folder(
    shared: Path, tmp_path: Path
) -> None:
    """It read the --state-dir folder's metrics.jsonl first: without that folder, "holds no
    run", whichever run --run-id named."""
    shown = as_json(
        shoal("rounds", "show", "7", "--registry", registry_url(shared), "--run-id", "another",
              "--state-dir", tmp_path / "elsewhere", "--json")
    )  # fmt: skip
    assert shown["rows"] == []
    assert sorted(entry["participant"] for entry in shown["participants"]) == ["p-a", "p-b"]


# --- audit verify on a folder that is no state folder ------------------------------------


def test_audit_verify_on_a_folder_without_a_registry_says_so_before_the_key(
    tmp_path: Path,
) -> None:
    """It said "cannot read the coordinator key .../model-signing.pub", where `shoal models
    list` on the same folder says that no registry is there."""
    result = shoal("audit", "verify", "--state-dir", tmp_path)
    assert result.exit_code == 1
    assert "no registry database at" in result.stderr
    assert "model-signing.pub" not in result.stderr


def test_audit_verify_on_a_registry_without_its_key_still_names_the_key(
    run: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "model-signing.pub").unlink()
    result = shoal("audit", "verify", "--state-dir", copy)
    assert result.exit_code == 2
    assert "model-signing.pub" in result.stderr


# --- the README's table of a run folder's files ------------------------------------------


def readme_run_folder_files() -> set[str]:
    """The names in the first column of the README's table of what a run folder holds."""
    text = (ROOT / "README.md").read_text()
    table = text.split("folder holds:", 1)[1].split("\n\n", 2)[1]
    names: set[str] = set()
    for line in table.splitlines()[2:]:
        first_cell = line.split("|")[1]
        names |= {name.rstrip("/") for name in re.findall(r"`([^`]+)`", first_cell)}
    return names


def test_the_readme_names_every_file_a_simulation_writes_in_its_run_folder(run: Path) -> None:
    written = {path.name for path in run.iterdir()}
    assert written - readme_run_folder_files() == set()


def test_the_readme_names_the_files_of_tracking_and_of_a_coordinators_state_folder() -> None:
    assert {"mlflow-run-id", "replay-nonces.bin"} <= readme_run_folder_files()


# --- simulate --quiet --------------------------------------------------------------------


def quiet_help() -> str:
    command: Any = typer.main.get_command(app)
    simulate = command.commands["simulate"]
    return next(param.help or "" for param in simulate.params if "--quiet" in param.opts)


def test_quiet_simulate_prints_what_its_help_says_the_run_folder_and_the_summary(
    tmp_path: Path,
) -> None:
    """The help said "Print only the final summary", and the run folder came first."""
    assert "run folder" in quiet_help()
    result = shoal("simulate", "--quiet", "--out", tmp_path / "run", *SMALL_SETS)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"run folder: {tmp_path / 'run'}"
    assert "summary" in lines[1]
    assert not HEADER.search(result.stdout)


# --- coordinator serve prints the round header once it is ready --------------------------


def test_coordinator_serve_prints_no_round_header_before_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default state folder lands here
    (tmp_path / "job.toml").write_text("")
    result = shoal("coordinator", "serve", "--config", tmp_path / "job.toml")
    assert result.exit_code == 2
    assert "coordinator.certificates" in result.stderr
    assert result.stdout == ""


def test_coordinator_serve_prints_the_round_header_after_it_is_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = {
        "round": 1, "phase": "fit", "selected": 2, "reported": 2, "dropped": 0, "loss": 0.5,
        "accuracy": 0.75, "virtual_time_s": 1.0, "wall_time_s": 0.5, "committed": True,
    }  # fmt: skip

    class Stopped:
        stop_reason = None
        summary = None  # (a statistics run's summary names what it counted)

        class run:  # noqa: N801 (the parts' run layer, as serve returns it)
            nothing_committed = None

    async def serve(config: Any, *, on_round: Any, on_ready: Any, **_: Any) -> Stopped:
        on_ready(50051, 1)
        on_round(row)
        return Stopped()

    monkeypatch.setattr("shoal.coordinator.server.serve", serve)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.toml").write_text("")
    result = shoal("coordinator", "serve", "--config", tmp_path / "job.toml", "--insecure")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if HEADER.match(line))
    listening = next(i for i, line in enumerate(lines) if "coordinator listening" in line)
    first_round = next(i for i, line in enumerate(lines) if " fit " in line)
    assert listening < header < first_round


# --- models list at 80 columns -----------------------------------------------------------


def commit_versions(folder: Path, name: str, count: int) -> None:
    """Versions 0 to ``count - 1`` of model ``name``, in the state folder ``folder``."""
    database = open_database(None, folder=folder / "registry")
    try:
        models = ModelRegistry(database, BlobStore(folder / "blobs"))
        for version in range(count):
            models.commit(
                name,
                Parameters.from_arrays([np.full(3, float(version))], names=["w"]),
                round=version,
                architecture_version="mlp-v1",
                metrics={"accuracy": 0.5 + version / 10, "loss": 1.0 - version / 10},
                now=datetime(2026, 3, 20, 10, 0, tzinfo=UTC) + timedelta(minutes=version),
            )
        if count > 1:
            models.mark(name, 1, ModelStatus.BAD, reason="accuracy fell by half")
    finally:
        database.close()


def test_models_list_is_readable_on_an_80_column_terminal(tmp_path: Path) -> None:
    """Its ten columns left the name, the reason and the metrics empty, the rest cut short."""
    commit_versions(tmp_path, "digits", 3)
    result = shoal("models", "list", "--state-dir", tmp_path, columns=80)
    assert result.exit_code == 0, result.output
    output = result.stdout
    assert all(len(line) <= 80 for line in output.splitlines())
    assert "…" not in output
    for shown in ("digits", "CANDIDATE", "BAD", "HEAD", "accuracy=0.7", "loss=0.8"):
        assert shown in output
    assert all(word in output for word in ("accuracy", "fell", "half"))


def test_models_list_of_several_models_names_the_model_of_each_row(tmp_path: Path) -> None:
    commit_versions(tmp_path, "digits", 2)
    commit_versions(tmp_path, "cluster-1", 1)
    result = shoal("models", "list", "--state-dir", tmp_path, columns=80)
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    named = [line for line in result.stdout.splitlines() if "HEAD" in line]
    assert len(named) == 2
    assert "cluster-1" in named[0] and "digits" in named[1]
