"""A 60% dropout wave in round 3 of a simulation, and the fallback the job chose at work."""

from __future__ import annotations

import json
import shlex
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.config import Config
from shoal.core import ConfigError
from shoal.simulation.dropouts import drop_time, dropped_in_wave, wave_dropout
from shoal.simulation.runner import Simulation
from shoal.telemetry import CohortDropped
from support.jobs import bare_config

WAVE_ROUND = 3


def job(fallback: str, *overrides: str, examples_per_second: float = 10.0) -> Config:
    """40 devices of one class that never drop but in the wave; 13 asked per round."""
    return bare_config(
        [
            "run.rounds=4",
            "data.num_clients=40",
            "data.partition='iid'",
            "round.clients_per_round=10",
            "round.deadline_s=20",
            f"round.drop_fallback='{fallback}'",
            "evaluation.every=0",
            "simulation.workers=0",
            f"devices.classes=[{{name='a', share=1.0, examples_per_second={examples_per_second}}}]",
            f"devices.dropout_waves=[{{round={WAVE_ROUND}, dropout=0.6}}]",
            *overrides,
        ]
    )


@pytest.fixture
def hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A ``module:function`` alert hook in a module of its own; see :func:`received_by`."""
    name = f"fallback_sink_{uuid.uuid4().hex[:8]}"
    module = "received = []\n\n\ndef take(alert):\n    received.append(alert)\n"
    (tmp_path / f"{name}.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"{name}:take"
    monkeypatch.delitem(sys.modules, name, raising=False)


def run(tmp_path: Path, config: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    summary = Simulation(config, tmp_path / "run").run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], summary


def wave_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    [row] = [r for r in rows if r["round"] == WAVE_ROUND]
    return row


def received_by(hook: str) -> list[CohortDropped]:
    """The alerts the hook's function was called with."""
    return list(sys.modules[hook.partition(":")[0]].received)


def test_only_the_wave_round_takes_a_fallback(tmp_path: Path) -> None:
    rows, summary = run(tmp_path, job("reselect"))
    assert [row["round"] for row in rows if "fallback" in row] == [WAVE_ROUND]
    assert all(row["committed"] for row in rows if row["round"] != WAVE_ROUND)
    assert summary["fallbacks"] == {"reselect": 1}


def test_the_wave_round_reselects_and_commits(tmp_path: Path, hook: str) -> None:
    rows, summary = run(tmp_path, job("reselect", f"alerts.hooks=['{hook}']"))
    row = wave_row(rows)
    fallback = row["fallback"]
    assert (fallback["kind"], fallback["configured"], fallback["cohort"]) == (
        "reselect",
        "reselect",
        13,
    )
    assert fallback["dropped"] == 7  # the moment more than half of 13 had dropped
    assert fallback["replacements"] > 0
    assert row["selected"] == 13 + fallback["replacements"]
    assert row["committed"] and row["reported"] == 10  # the target, thanks to replacements
    [alert] = received_by(hook)
    assert isinstance(alert, CohortDropped)
    assert (alert.round, alert.phase, alert.fallback, alert.committed) == (
        WAVE_ROUND,
        "fit",
        "reselect",
        True,
    )
    assert alert.replacements == fallback["replacements"]
    assert summary["fallbacks"] == {"reselect": 1}


def test_without_a_fallback_the_wave_round_is_lost(tmp_path: Path) -> None:
    rows, _ = run(tmp_path, job("none"))
    row = wave_row(rows)
    assert not row["committed"] and row["fallback"]["kind"] == "none"
    assert row["selected"] == 13 and row["reported"] < 8  # below the quorum
    assert row["reported"] + row["dropped"] == 13  # closed once every member was accounted for


def test_the_wave_round_extends_and_late_members_count(tmp_path: Path, hook: str) -> None:
    """Slow devices (about the deadline's length of work): the extension lets stragglers in."""
    slow = {"examples_per_second": 1.4}
    extended, _ = run(tmp_path / "extend", job("extend", f"alerts.hooks=['{hook}']", **slow))
    waited, _ = run(tmp_path / "none", job("none", **slow))
    row, plain = wave_row(extended), wave_row(waited)
    assert row["fallback"]["kind"] == "extend" and row["fallback"]["extended_by_s"] == 20.0
    assert row["reported"] > plain["reported"]  # members past the first deadline counted
    start = extended[1]["virtual_time_s"]
    assert row["virtual_time_s"] > start + 20 >= plain["virtual_time_s"] - 1e-9
    [alert] = received_by(hook)
    assert (alert.fallback, alert.extended_by_s) == ("extend", 20.0)


def test_the_wave_round_aborts_at_once_and_keeps_the_model(tmp_path: Path, hook: str) -> None:
    rows, summary = run(tmp_path, job("abort", f"alerts.hooks=['{hook}']"))
    row = wave_row(rows)
    assert row["fallback"]["kind"] == "abort" and not row["committed"]
    assert "the round is aborted and the model kept" in row["abort_reason"]
    assert row["model_version"] == rows[1]["model_version"]  # the model of round 2 stays
    assert row["virtual_time_s"] == row["fallback"]["at"]  # no waiting for the deadline
    assert row["virtual_time_s"] < rows[1]["virtual_time_s"] + 20
    [alert] = received_by(hook)
    assert (alert.fallback, alert.committed, alert.dropped, alert.cohort) == ("abort", False, 7, 13)
    assert summary["fallbacks"] == {"abort": 1} and summary["rounds_aborted"] == 1


def test_a_command_hook_is_told_of_the_wave(tmp_path: Path) -> None:
    received = tmp_path / "alert.json"
    command = f"cat > {shlex.quote(str(received))}"
    run(tmp_path, job("abort", f"alerts.commands=[{json.dumps(command)}]"))
    alert = json.loads(received.read_text())
    assert alert["kind"] == "cohort_dropped"
    assert (alert["round"], alert["fallback"], alert["run_id"]) == (WAVE_ROUND, "abort", "shoal")


def test_a_wave_run_is_reproducible(tmp_path: Path) -> None:
    first, _ = run(tmp_path / "one", job("reselect"))
    second, _ = run(tmp_path / "two", job("reselect"))
    for rows in (first, second):
        for row in rows:
            row.pop("wall_time_s")
    assert first == second


def test_a_run_resumed_before_the_wave_replays_it_the_same(tmp_path: Path) -> None:
    straight, _ = run(tmp_path / "straight", job("reselect"))
    Simulation(job("reselect", "run.rounds=2"), tmp_path / "resumed").run()
    Simulation(job("reselect"), tmp_path / "resumed", resume=True).run()
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    resumed = [json.loads(line) for line in lines]
    for rows in (straight, resumed):
        for row in rows:
            row.pop("wall_time_s")
    assert resumed == straight


# --- secure rounds: the cohort is fixed once keys are advertised ------------------------------


def secure(fallback: str, *overrides: str) -> Config:
    return job(
        fallback,
        "run.rounds=3",
        "secure_aggregation.protocol='secagg+'",
        "secure_aggregation.max_weight=100",
        *overrides,
    )


def test_a_secure_wave_round_that_cannot_reach_its_quorum_aborts(tmp_path: Path) -> None:
    rows, _ = run(tmp_path, secure("reselect"))
    row = wave_row(rows)
    fallback = row["fallback"]
    assert (fallback["kind"], fallback["configured"], fallback["replacements"]) == (
        "abort",
        "reselect",
        0,
    )
    assert "secure round" in fallback["note"] and not row["committed"]
    assert row["virtual_time_s"] == fallback["at"]


def test_a_secure_round_that_can_still_finish_lets_its_protocol_recover(tmp_path: Path) -> None:
    wave = f"devices.dropout_waves=[{{round={WAVE_ROUND}, dropout=0.3}}]"
    rows, _ = run(
        tmp_path, secure("extend", wave, "round.drop_fallback_at=0.2", "round.quorum=0.5")
    )
    row = wave_row(rows)
    assert row["fallback"]["kind"] == "none" and row["fallback"]["configured"] == "extend"
    assert row["committed"]  # SecAgg+ recovered the round without the dropped members
    assert row["secure_dropped"]["masked_input"] >= row["fallback"]["dropped"]


# --- the wave itself -------------------------------------------------------------------------


def test_a_wave_takes_about_its_share_and_only_in_its_round() -> None:
    config = job("none")
    waves = config.devices.dropout_waves
    assert wave_dropout(waves, WAVE_ROUND) == 0.6 and wave_dropout(waves, 2) == 0.0
    clients = [f"client-{index}" for index in range(2000)]
    taken = [c for c in clients if dropped_in_wave(waves, seed=0, round_number=3, client_id=c)]
    assert 0.55 < len(taken) / len(clients) < 0.65
    assert not any(dropped_in_wave(waves, seed=0, round_number=2, client_id=c) for c in clients)
    assert not dropped_in_wave([], seed=0, round_number=3, client_id="client-0")


def test_a_drop_comes_within_the_task_and_never_after_the_deadline() -> None:
    times = [
        drop_time(seed=1, round_number=2, client_id=f"c{i}", start=10.0, deadline_at=30.0,
                  duration=5.0)
        for i in range(200)
    ]  # fmt: skip
    assert all(10.0 <= at <= 15.0 for at in times)
    late = drop_time(seed=1, round_number=2, client_id="c0", start=10.0, deadline_at=11.0,
                     duration=500.0)  # fmt: skip
    assert late <= 11.0
    assert drop_time(seed=1, round_number=2, client_id="c0", start=10.0, deadline_at=30.0,
                     duration=0.0) == 10.0  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("devices.dropout_waves=[{round=3, dropout=1.5}]", "dropout"),
        ("devices.dropout_waves=[{round=0, dropout=0.5}]", "round"),
        ("devices.dropout_waves=[{round=3, dropout=0.5}, {round=3, dropout=0.2}]", "one dropout"),
        ("round.drop_fallback='retry'", "drop_fallback"),
        ("round.drop_fallback_at=1.0", "drop_fallback_at"),
        ("round.drop_extend_s=0", "drop_extend_s"),
        ("round.drop_reselect_min_left=0", "drop_reselect_min_left"),
        ("alerts.hooks=['no colon']", "alerts.hooks"),
    ],
)
def test_a_bad_wave_or_fallback_is_a_clear_config_error(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        bare_config([override])


def test_a_hook_that_cannot_be_imported_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot import"):
        run(tmp_path, job("abort", "alerts.hooks=['no_such_module_here:take']"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
