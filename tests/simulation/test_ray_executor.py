"""The Ray backend gives the very run the local backends give."""

from __future__ import annotations

import json
import subprocess
import sys
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

# the Ray run in a process of its own, as a user's `shoal simulate` or script starts it: Ray
# forks its cluster's servers from the process that calls ray.init, and a test process that
# ran gRPC tests before holds gRPC's threads, among which such a fork once left Ray's GCS
# server never started (the run then fails after Ray's 180 s wait for its port)
RAY_RUN = """\
import sys
from pathlib import Path

from shoal.config import apply_overrides, parse_config
from shoal.simulation.runner import Simulation

if __name__ == "__main__":
    config = parse_config(apply_overrides({}, sys.argv[2:]))
    Simulation(config, Path(sys.argv[1])).run()
"""


def rows(folder: Path) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in found:
        row.pop("wall_time_s")
    return found


def test_ray_backend_matches_the_in_process_run(tmp_path: Path) -> None:
    Simulation(bare_config([*SMALL, "simulation.workers=0"]), tmp_path / "local").run()
    script = tmp_path / "ray_run.py"
    script.write_text(RAY_RUN)
    ray_run = [*SMALL, "simulation.workers=2", "simulation.backend=ray"]
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ray"), *ray_run],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert rows(tmp_path / "ray") == rows(tmp_path / "local")
