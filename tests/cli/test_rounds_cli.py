"""``shoal rounds show`` on simulated run folders whose rounds recorded no participant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.config import parse_config
from shoal.simulation.runner import Simulation

NAME = "all-denied"
SMALL: dict[str, Any] = {
    "run": {"name": NAME, "rounds": 1},
    "data": {"num_clients": 6},
    "round": {"clients_per_round": 3, "over_selection": 1.0, "deadline_s": 600.0},
    "evaluation": {"every": 0},
    "simulation": {"workers": 0},
}


def shoal(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "220"}).invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def denied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated run whose policy denied every update: no participant was recorded."""
    folder = tmp_path_factory.mktemp("denied")
    Simulation(parse_config({**SMALL, "policy": {"max_l2_norm": 0.0001}}), folder).run()
    return folder


def test_a_round_whose_every_update_was_denied_shows_its_row_and_the_denials(
    denied: Path,
) -> None:
    """It said "give --run-id: the registry holds participants of runs: none"."""
    result = shoal("rounds", "show", "1", "--state-dir", denied, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["run_id"] == NAME
    assert [row["committed"] for row in shown["rows"]] == [False]
    assert shown["participants"] == []
    assert len(shown["decisions"]) == 3
    assert not any(decision["allowed"] for decision in shown["decisions"])


def test_a_simulated_run_answers_to_its_run_name_not_the_coordinators_default_id(
    denied: Path,
) -> None:
    """The folder's config.json holds coordinator.run_id = "run-1" too, a default that the
    simulation never used: the rows were shown as run-1's, without its decisions."""
    other = shoal("rounds", "show", "1", "--state-dir", denied, "--run-id", "run-1")
    assert other.exit_code == 1
    assert "run 'run-1' has no round 1 on record" in other.output
    assert f"this folder's run is '{NAME}'" in other.output
    own = shoal("rounds", "show", "1", "--state-dir", denied, "--run-id", NAME)
    assert own.exit_code == 0, own.output
    assert f"round 1 (fit) of run {NAME}" in own.output


def test_a_folder_that_names_no_run_says_that_no_round_was_recorded(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    quiet = {**SMALL, "round": {**SMALL["round"], "deadline_s": 0.001}}  # nobody reports
    Simulation(parse_config(quiet), folder).run()
    (folder / "config.json").unlink()
    result = shoal("rounds", "show", "1", "--state-dir", folder)
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "give --run-id" in message and "config.json names no run" in message
    assert "the registry recorded no participants or policy decisions" in message
    assert "runs: none" not in message


def test_a_folder_without_its_config_shows_the_one_run_on_record(
    denied: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(denied, copy)
    (copy / "config.json").unlink()
    result = shoal("rounds", "show", "1", "--state-dir", copy, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run_id"] == NAME
