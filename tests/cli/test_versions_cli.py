"""``shoal versions require`` on a simulated run folder: refused, since no simulation reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.config import parse_config
from shoal.registry import VersionMatrix, registry_location
from shoal.simulation.runner import Simulation

ARCHITECTURE = "shoal.apps.builtin:client_app"  # the built-in app's, as a coordinator names it
SMALL: dict[str, Any] = {
    "run": {"name": "versions", "rounds": 1},
    "data": {"num_clients": 6},
    "round": {"clients_per_round": 3, "over_selection": 1.0},
    "evaluation": {"every": 0},
    "simulation": {"workers": 0},
}


def shoal(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(arg) for arg in args])


def stored_models(folder: Path) -> list[str]:
    with registry_location(folder, None).open() as database:
        return VersionMatrix(database).models()


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("simulated")
    Simulation(parse_config(SMALL), folder).run()
    return folder


def test_a_requirement_on_a_simulated_run_folder_is_refused_saying_where_it_goes(
    simulated: Path,
) -> None:
    """It was stored, and a resumed simulation went on selecting the clients it excludes."""
    result = shoal(
        "versions", "require", ARCHITECTURE, "--component", "app", "--minimum", "2",
        "--state-dir", simulated,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "is a simulation's run folder" in message
    assert "[[versions.require]]" in message and "from_round" in message
    assert "Traceback" not in result.output
    assert stored_models(simulated) == []


def test_the_jobs_own_requirement_is_what_a_simulation_applies(tmp_path: Path) -> None:
    """What the refusal points to: the job's entries exclude the clients from their round on."""
    require = [{"component": "app", "minimum": "99", "from_round": 2}]
    job = {**SMALL, "run": {"name": "versions", "rounds": 2}, "versions": {"require": require}}
    Simulation(parse_config(job), tmp_path).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["committed"] for row in rows] == [True, False]
    assert rows[1]["excluded"]["versions"] > 0


def test_a_coordinators_state_folder_still_takes_requirements(tmp_path: Path) -> None:
    """A coordinator reads its registry's matrix at each selection: only a simulation's folder
    is refused (a coordinator's config.json names a run too)."""
    (tmp_path / "config.json").write_text(json.dumps({"run": {"name": "served"}}))
    result = shoal(
        "versions", "require", ARCHITECTURE, "--component", "app", "--minimum", "2",
        "--state-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stored_models(tmp_path) == [ARCHITECTURE]
