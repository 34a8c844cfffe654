"""A delta that guarantees little is warned about once, when the run plans its privacy.

Unset, delta is 1 / population: 0.25 for four clients, where (epsilon, delta)-DP
allows each client's data to be published outright with probability 1/4.
Small simulations and tests run with it, so it is warned about, not refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from shoal.config import parse_config
from shoal.privacy.run import LARGEST_QUIET_DELTA, RunPrivacy
from shoal.registry import registry_location
from shoal.simulation.runner import Simulation

pytestmark = pytest.mark.filterwarnings("ignore::shoal.privacy.noise.InsecureNoiseWarning")

FEW: dict[str, Any] = {
    "run": {"rounds": 3, "seed": 1},
    "data": {"num_clients": 4},
    "round": {"clients_per_round": 2, "over_selection": 1.0},
    "evaluation": {"every": 0},
    "simulation": {"workers": 0},
}
PRIVACY = {"placement": "central", "noise_multiplier": 1.0, "secure_noise": False}


def delta_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "shoal.privacy"
        and record.levelno == logging.WARNING
        and "guarantees little" in record.getMessage()
    ]


def test_four_clients_run_with_delta_one_quarter_and_one_warning_that_says_what_to_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="shoal.privacy"):
        summary = Simulation(parse_config({**FEW, "privacy": PRIVACY}), tmp_path).run()
    assert summary["delta"] == pytest.approx(0.25)  # still runs: warned, not refused
    (warning,) = delta_warnings(caplog)  # once for the run, not once per round
    assert "delta 0.25 (1 / 4 eligible clients, the default)" in warning
    assert "published outright with probability delta" in warning
    assert "1 of the 4 eligible clients" in warning
    assert "set privacy.delta" in warning and "or train with more clients" in warning
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3


def test_a_delta_set_well_below_one_over_the_population_is_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    privacy = {**PRIVACY, "delta": 1e-5}
    with caplog.at_level(logging.WARNING, logger="shoal.privacy"):
        Simulation(parse_config({**FEW, "privacy": privacy}), tmp_path).run()
    assert delta_warnings(caplog) == []


def test_a_large_delta_that_was_set_is_warned_about_without_asking_for_more_clients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_config({**FEW, "privacy": {**PRIVACY, "delta": 0.01}})
    with caplog.at_level(logging.WARNING, logger="shoal.privacy"):
        planned(config, tmp_path, population=10_000)
    (warning,) = delta_warnings(caplog)
    assert "delta 0.01 (privacy.delta)" in warning and "100 of the 10000" in warning
    assert "more clients" not in warning


@pytest.mark.parametrize(("population", "warned"), [(1000, False), (999, True), (4, True)])
def test_the_default_delta_is_warned_about_past_one_in_a_thousand(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, population: int, warned: bool
) -> None:
    assert LARGEST_QUIET_DELTA == 1e-3
    config = parse_config({**FEW, "privacy": PRIVACY})
    with caplog.at_level(logging.WARNING, logger="shoal.privacy"):
        planned(config, tmp_path, population=population, rounds=2)  # planned once: one warning
    assert len(delta_warnings(caplog)) == int(warned)


def planned(config: Any, folder: Path, *, population: int, rounds: int = 1) -> None:
    """The run's privacy, planned at its first fit round for ``population`` clients, and
    checked before each of ``rounds`` fit rounds."""
    privacy = RunPrivacy(config, cohort=2, clients_per_round=2, min_clients=2, run_id="small")
    database = registry_location(folder, None).open()
    try:
        privacy.open(database)
        for round_number in range(1, rounds + 1):
            privacy.before_round(round_number, population=population)
    finally:
        database.close()
