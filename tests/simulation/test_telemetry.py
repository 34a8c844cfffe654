"""Fleet telemetry in a simulation: two device classes of different speeds, seen in every row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shoal.config import Config
from shoal.simulation.runner import Simulation
from support.jobs import bare_config

FAST = "{name='fast', share=0.5, examples_per_second=200, download_mbps=100, upload_mbps=50}"
SLOW = "{name='slow', share=0.5, examples_per_second=5, download_mbps=2, upload_mbps=1}"
CLASSES = f"devices.classes=[{FAST}, {SLOW}]"
TIMINGS = ("rtt", "train", "deadline_share")


def job(*overrides: str) -> Config:
    return bare_config(
        [
            "run.rounds=2",
            "data.num_clients=16",
            "round.clients_per_round=8",
            "round.over_selection=1.0",
            "round.quorum=0.5",
            "round.deadline_s=600",
            "evaluation.every=1",
            "evaluation.clients=8",
            "simulation.workers=0",
            "devices.speed_jitter=0",
            CLASSES,
            *overrides,
        ]
    )


def rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_every_row_holds_the_fleet_figures_by_device_class(tmp_path: Path) -> None:
    summary = Simulation(job(), tmp_path).run()
    written = rows(tmp_path)
    assert {row["phase"] for row in written} == {"fit", "evaluate"}
    for row in written:
        assert row["drop_rate"] == pytest.approx(
            (row["selected"] - row["reported"]) / row["selected"]
        )
        assert sum(row["drops_by_reason"].values()) == row["selected"] - row["reported"]
        assert sum(row["drops_by_stage"].values()) == row["selected"] - row["reported"]
        for name in TIMINGS:
            p50, p90, p99 = (row[f"{name}_p{q}{'' if name == 'deadline_share' else '_s'}"]
                             for q in (50, 90, 99))  # fmt: skip
            assert 0 < p50 <= p90 <= p99
        assert row["straggler_index"] == row["deadline_share_p90"]
        fairness = row["fairness"]
        assert set(fairness) == {"fast", "slow"}
        shares = [entry["participation_share"] for entry in fairness.values()]
        assert sum(shares) == pytest.approx(1.0)
        population = [entry["population_share"] for entry in fairness.values()]
        assert sum(population) == pytest.approx(1.0)
        assert row["bytes_up_per_client"] == row["bytes_up"] / row["reported"]
        assert row["bytes_down_per_client"] == row["bytes_down"] / row["selected"]
    evaluation = next(row for row in written if row["phase"] == "evaluate")
    accuracies = {name: entry["accuracy"] for name, entry in evaluation["fairness"].items()}
    assert all(0 <= accuracy <= 1 for accuracy in accuracies.values())
    mean = sum(accuracies.values()) / 2
    assert evaluation["fairness_gap"] == pytest.approx(mean - min(accuracies.values()))
    fit = next(row for row in written if row["phase"] == "fit")
    assert all(entry["accuracy"] is None for entry in fit["fairness"].values())
    assert summary["drop_rate"] is not None and summary["straggler_index"] > 0
    assert summary["fairness_gap"] == written[-1]["fairness_gap"]
    assert summary["drift_bimodal_rounds"] == 0


def test_the_slow_class_takes_longer_round_trips(tmp_path: Path) -> None:
    fast = Simulation(job(f"devices.classes=[{FAST}]"), tmp_path / "fast")
    slow = Simulation(job(f"devices.classes=[{SLOW}]"), tmp_path / "slow")
    fast.run()
    slow.run()
    fast_row, slow_row = rows(tmp_path / "fast")[0], rows(tmp_path / "slow")[0]
    assert slow_row["rtt_p50_s"] > fast_row["rtt_p50_s"]
    assert slow_row["train_p50_s"] > fast_row["train_p50_s"]
    assert slow_row["straggler_index"] > fast_row["straggler_index"]
    assert slow_row["fairness"]["slow"]["participation_share"] == 1.0


def test_without_telemetry_the_rows_hold_none_of_it(tmp_path: Path) -> None:
    summary = Simulation(job("telemetry.enabled=false", "run.rounds=1"), tmp_path).run()
    for row in rows(tmp_path):
        assert "drop_rate" not in row and "fairness" not in row and "rtt_p50_s" not in row
    assert "straggler_index" not in summary
