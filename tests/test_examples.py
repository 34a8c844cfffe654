"""Every example config is valid and runs as it is (two rounds, in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.aggregation.strategy import PRESETS
from shoal.config import config_to_dict, default_config_path, load_config, parse_config
from shoal.simulation.runner import Simulation

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


def test_every_preset_has_an_example() -> None:
    names = {path.stem for path in EXAMPLES}
    assert {f"digits-{preset}" for preset in PRESETS} <= names
    assert {"fedprox-synthetic", "overhead-100", "overhead-1000"} <= names


JOBS = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*/job.toml"))


@pytest.mark.parametrize(
    "path",
    [*EXAMPLES, *JOBS, default_config_path()],
    ids=lambda path: f"{path.parent.name}/{path.stem}",
)
def test_a_runs_config_json_reads_back_as_the_same_config(path: Path) -> None:
    """What --resume and unlearning read: config.json holds every default, which no section
    may take for a key the user set (a run with [[attack]] could not be resumed)."""
    config = load_config(path)
    assert parse_config(json.loads(json.dumps(config_to_dict(config)))) == config


@pytest.mark.parametrize("path", [*EXAMPLES, default_config_path()], ids=lambda path: path.stem)
def test_example_runs(path: Path, tmp_path: Path) -> None:
    config = load_config(path, ["run.rounds=2", "simulation.workers=0"])
    summary = Simulation(config, tmp_path).run()
    assert summary["rounds_completed"] + summary["rounds_aborted"] == 2
    if path.stem.startswith("digits") or path == default_config_path():
        assert summary["rounds_completed"] >= 1
