"""Every example config is valid and runs as it is (two rounds, in process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.aggregation.strategy import PRESETS
from shoal.config import default_config_path, load_config
from shoal.simulation.runner import Simulation

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


def test_every_preset_has_an_example() -> None:
    names = {path.stem for path in EXAMPLES}
    assert {f"digits-{preset}" for preset in PRESETS} <= names
    assert {"fedprox-synthetic", "overhead-100", "overhead-1000"} <= names


@pytest.mark.parametrize("path", [*EXAMPLES, default_config_path()], ids=lambda path: path.stem)
def test_example_runs(path: Path, tmp_path: Path) -> None:
    config = load_config(path, ["run.rounds=2", "simulation.workers=0"])
    summary = Simulation(config, tmp_path).run()
    assert summary["rounds_completed"] + summary["rounds_aborted"] == 2
    if path.stem.startswith("digits") or path == default_config_path():
        assert summary["rounds_completed"] >= 1
