"""The metrics log: JSON lines, NaN as null, torn lines skipped, truncation."""

from __future__ import annotations

import json
from pathlib import Path

from shoal.telemetry import MetricsLog


def test_append_and_read_back(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.rows() == []
    log.append({"round": 1, "loss": float("nan"), "nested": {"x": float("inf")}})
    log.append({"round": 2, "loss": 0.5})
    assert log.rows() == [
        {"round": 1, "loss": None, "nested": {"x": None}},
        {"round": 2, "loss": 0.5},
    ]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN literals


def test_torn_last_line_is_skipped_and_truncate_keeps_what_it_is_told(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for round_number in range(1, 5):
        log.append({"round": round_number})
    with log.path.open("a") as handle:
        handle.write('{"round": 5, "lo')
    assert [row["round"] for row in log.rows()] == [1, 2, 3, 4]
    kept = log.truncate(lambda row: row["round"] <= 2)
    assert [row["round"] for row in kept] == [1, 2]
    assert log.path.read_text().count("\n") == 2
