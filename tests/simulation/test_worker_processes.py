"""A pool starts no more worker processes than its batches have jobs for, nor than the machine
has CPUs: ``simulation.workers = 1024`` on 10 clients a round started 1023 processes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from shoal.simulation import runner
from shoal.simulation.executor import Executor, ProcessExecutor, SerialExecutor, make_executor
from shoal.simulation.runner import Simulation, final_parameters
from support.jobs import bare_config, rows_without_wall
from support.whereabouts import WhereaboutsClient


def small(*overrides: str) -> Any:
    base = [
        "run.rounds=3",
        "data.num_clients=12",
        "round.clients_per_round=4",
        "evaluation.every=2",
        "evaluation.clients=4",
        "devices.classes=[{name='a', share=1.0, dropout=0.1}]",
    ]
    return bare_config([*base, *overrides])


def test_a_pool_of_64_on_4_clients_a_round_starts_3_workers_and_runs_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine would run them all
    made: list[Executor] = []

    def recorded(*args: Any, **kwargs: Any) -> Executor:
        made.append(make_executor(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(runner, "make_executor", recorded)
    with caplog.at_level(logging.INFO, logger="shoal.simulation"):
        Simulation(small("simulation.workers=64"), tmp_path / "wide").run()
    Simulation(small("simulation.workers=2"), tmp_path / "pair").run()
    wide, pair = made
    assert isinstance(wide, ProcessExecutor) and isinstance(pair, ProcessExecutor)
    assert 2 <= wide.worker_processes <= 3 and pair.worker_processes == 1
    ran = f"{wide.worker_processes + 1} of the 64 processes ran"
    assert any(ran in record.getMessage() for record in caplog.records)
    assert rows_without_wall(tmp_path / "wide") == rows_without_wall(tmp_path / "pair")
    assert (
        final_parameters(tmp_path / "wide").sha256() == final_parameters(tmp_path / "pair").sha256()
    )


def test_a_pool_is_no_wider_than_the_machine_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    with caplog.at_level(logging.INFO, logger="shoal.simulation"):
        pool = make_executor(WhereaboutsClient, workers=64)
    try:
        assert isinstance(pool, ProcessExecutor) and pool.workers == 3
    finally:
        pool.close()
    (line,) = [record.getMessage() for record in caplog.records if "CPU" in record.getMessage()]
    assert "64" in line and "3" in line
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    alone = make_executor(WhereaboutsClient, workers=8)
    try:
        assert isinstance(alone, SerialExecutor)  # one CPU: this process alone
    finally:
        alone.close()


def test_an_unknown_cpu_count_leaves_the_pool_as_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    pool = make_executor(WhereaboutsClient, workers=3)
    try:
        assert isinstance(pool, ProcessExecutor) and pool.workers == 3
        assert pool.worker_processes == 1  # the rest start when a batch has jobs for them
    finally:
        pool.close()
