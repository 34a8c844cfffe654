"""The metrics log: JSON lines, NaN as null, torn lines skipped, truncation."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.config import load_config
from shoal.core.errors import RunError
from shoal.simulation.runner import Simulation
from shoal.telemetry import MetricsLog
from shoal.telemetry.metrics import clean_row, read_rows, strict_line


def test_append_and_read_back(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.rows() == []
    log.append({"round": 1, "phase": "fit", "loss": float("nan"), "nested": {"x": float("inf")}})
    log.append({"round": 2, "phase": "fit", "loss": 0.5})
    assert log.rows() == [
        {"round": 1, "phase": "fit", "loss": None, "nested": {"x": None}},
        {"round": 2, "phase": "fit", "loss": 0.5},
    ]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN literals


def test_torn_last_line_is_skipped_and_truncate_keeps_what_it_is_told(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "drift.jsonl")
    for round_number in range(1, 5):
        log.append({"round": round_number})
    with log.path.open("a") as handle:
        handle.write('{"round": 5, "lo')
    assert [row["round"] for row in log.rows()] == [1, 2, 3, 4]
    kept = log.truncate(lambda row: row["round"] <= 2)
    assert [row["round"] for row in kept] == [1, 2]
    assert log.path.read_text().count("\n") == 2


def test_appends_keep_one_descriptor_that_follows_truncation_and_closes(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "drift.jsonl")
    log.append({"round": 1})
    log.append_line('{"round": 2}')
    assert descriptors_of(log.path) == 1  # one, kept from the first append
    log.truncate(lambda row: row["round"] == 1)  # a new file: the next append goes there
    assert descriptors_of(log.path) == 0
    log.append({"round": 3})
    assert [row["round"] for row in log.rows()] == [1, 3]
    log.close()
    assert descriptors_of(log.path) == 0
    log.close()  # twice is nothing
    log.append({"round": 4})  # reopened
    assert [row["round"] for row in MetricsLog(log.path).rows()] == [1, 3, 4]
    path = log.path
    del log
    gc.collect()
    assert descriptors_of(path) == 0  # collected: closed


def descriptors_of(path: Path) -> int:
    """How many of this process's descriptors point at ``path``."""
    return sum(1 for pointed in open_pointers() if pointed == os.path.realpath(path))


def open_pointers() -> list[str]:
    """What this process's descriptors point at."""
    pointed = []
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            pointed.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        except OSError:  # the listing's own, closed by now
            continue
    return pointed


def test_a_run_closes_its_logs_when_it_ends(tmp_path: Path) -> None:
    config = load_config(None, ["run.rounds=2", "simulation.workers=0", "drift.enabled=true"])
    Simulation(config, tmp_path / "run").run()
    logs = {os.path.realpath(tmp_path / "run" / name) for name in ("metrics.jsonl", "drift.jsonl")}
    assert (tmp_path / "run" / "drift.jsonl").read_text().count("\n") == 2
    assert not logs & set(open_pointers())


finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.none(), st.text(max_size=3)
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=4),
        st.one_of(finite_or_not, st.dictionaries(st.text(max_size=3), finite_or_not, max_size=3)),
        max_size=6,
    )
)
def test_a_line_is_the_cleaned_rows_encoding_whether_or_not_it_holds_nan(row: dict) -> None:
    assert strict_line(row) == json.dumps(clean_row(row), sort_keys=True)


@pytest.mark.parametrize(
    "line",
    ["{}", '{"round": "1", "phase": "fit"}', '{"round": true, "phase": "fit"}', '{"round": 1}',
     '{"round": 1.0, "phase": "fit"}', '{"round": 1, "phase": null}', "[1]", "not json"],
)  # fmt: skip
def test_a_line_without_a_rows_round_and_phase_is_left_out_and_never_rewritten(
    tmp_path: Path, line: str
) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"round": 1, "phase": "fit"}}\n{line}\n{{"round": 2, "phase": "fit"}}\n')
    assert read_rows(path) == ([{"round": 1, "phase": "fit"}, {"round": 2, "phase": "fit"}], [2])
    log = MetricsLog(path)
    assert [row["round"] for row in log.rows()] == [1, 2]
    text = path.read_text()
    with pytest.raises(RunError, match=r"metrics\.jsonl: line 2 is not a row"):
        log.truncate(lambda row: True)
    assert path.read_text() == text and not path.with_name("metrics.jsonl.partial").exists()


def test_a_drift_record_needs_only_its_integer_round(tmp_path: Path) -> None:
    path = tmp_path / "drift.jsonl"
    path.write_text('{"round": 1}\n{"round": false}\n\n{"round": 3, "points": []}\n{"round"')
    assert read_rows(path) == ([{"round": 1}, {"round": 3, "points": []}], [2])
    assert read_rows(tmp_path / "missing.jsonl") == ([], [])  # the empty case
