"""The embedded default, `make run`'s main job, does what the README promises."""

from __future__ import annotations

import json
from pathlib import Path

from shoal.config import default_config_path, load_config
from shoal.simulation.runner import Simulation


def test_default_reaches_92_percent_with_a_fifth_of_the_cohort_lost(tmp_path: Path) -> None:
    config = load_config(default_config_path(), ["simulation.workers=0"])
    assert config.data.num_clients == 100 and config.round.clients_per_round == 20
    assert config.data.partition == "dirichlet"
    summary = Simulation(config, tmp_path).run()
    assert summary["final_accuracy"] >= 0.92
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fits = [row for row in rows if row["phase"] == "fit"]
    selected = sum(row["selected"] for row in fits)
    lost = sum(row["dropped"] + row["stragglers"] for row in fits)
    assert 0.1 <= lost / selected <= 0.3
    assert any(row["phase"] == "evaluate" for row in rows)
