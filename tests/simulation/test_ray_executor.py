"""The Ray backend gives the very run the local backends give."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shoal.simulation.runner import Simulation
from support.jobs import bare_config

pytest.importorskip("ray")

SMALL = [
    "run.rounds=3",
    "data.num_clients=16",
    "round.clients_per_round=4",
    "evaluation.every=2",
    "evaluation.clients=4",
]


def rows(folder: Path) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in found:
        row.pop("wall_time_s")
    return found


def test_ray_backend_matches_the_in_process_run(tmp_path: Path) -> None:
    Simulation(bare_config([*SMALL, "simulation.workers=0"]), tmp_path / "local").run()
    ray_config = bare_config([*SMALL, "simulation.workers=2", "simulation.backend=ray"])
    Simulation(ray_config, tmp_path / "ray").run()
    assert rows(tmp_path / "ray") == rows(tmp_path / "local")
