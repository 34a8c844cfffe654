"""``shoal versions require`` on a simulated run folder: the resumed simulation applies it.

It was stored, and a resumed simulation went on selecting the clients it excludes: the
simulation screened its devices with the job's entries alone, while a coordinator's registry
selects with the matrix too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.config import parse_config
from shoal.registry import VersionMatrix, registry_location
from shoal.simulation.runner import Simulation, load_run_config

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


def test_a_requirement_on_a_simulated_run_folder_applies_when_it_resumes(
    simulated: Path,
) -> None:
    architecture = json.loads((simulated / "summary.json").read_text())["architecture"]
    result = shoal(
        "versions", "require", architecture, "--component", "app", "--minimum", "99",
        "--state-dir", simulated,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stored_models(simulated) == [architecture]
    config = load_run_config(simulated)
    resumed = config.model_copy(update={"run": config.run.model_copy(update={"rounds": 2})})
    Simulation(resumed, simulated, resume=True).run()
    rows = [json.loads(line) for line in (simulated / "metrics.jsonl").read_text().splitlines()]
    assert [row["committed"] for row in rows] == [True, False]  # no client runs app 99
    assert rows[1]["excluded"]["versions"] > 0


def test_the_jobs_own_requirement_is_what_a_simulation_applies(tmp_path: Path) -> None:
    """The job's own entries exclude the clients from their round on, as they did."""
    require = [{"component": "app", "minimum": "99", "from_round": 2}]
    job = {**SMALL, "run": {"name": "versions", "rounds": 2}, "versions": {"require": require}}
    Simulation(parse_config(job), tmp_path).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["committed"] for row in rows] == [True, False]
    assert rows[1]["excluded"]["versions"] > 0


def test_a_coordinators_state_folder_still_takes_requirements(tmp_path: Path) -> None:
    """A coordinator reads its registry's matrix at each selection."""
    (tmp_path / "config.json").write_text(json.dumps({"run": {"name": "served"}}))
    result = shoal(
        "versions", "require", ARCHITECTURE, "--component", "app", "--minimum", "2",
        "--state-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stored_models(tmp_path) == [ARCHITECTURE]


def test_a_requirement_on_a_model_name_or_in_a_new_folder_is_told(
    simulated: Path, tmp_path: Path
) -> None:
    """`versions require global` took the model's name, which the matrix never matches (it
    keys on the architecture), and a mistyped folder got a registry of its own, both silently."""
    architecture = json.loads((simulated / "summary.json").read_text())["architecture"]
    named = shoal(
        "versions", "require", "global", "--component", "app", "--minimum", "2",
        "--state-dir", simulated, "--json",
    )  # fmt: skip
    assert named.exit_code == 0, named.output
    assert json.loads(named.stdout)[0]["model"] == "global"  # stdout stays the JSON
    assert "no version in the registry is of model architecture 'global'" in named.stderr
    assert f"architectures: {architecture})" in named.stderr
    fresh = shoal(
        "versions", "require", architecture, "--component", "app", "--minimum", "2",
        "--state-dir", tmp_path / "typo",
    )  # fmt: skip
    assert fresh.exit_code == 0, fresh.output
    assert "no registry was at " in fresh.stderr and "made one" in fresh.stderr
    clear = shoal("versions", "clear", "global", "--state-dir", simulated)
    assert clear.exit_code == 0, clear.output
