"""The drop fallback on the live coordinator: clients report failures over real gRPC.

The coordinator is the one ``shoal coordinator serve`` runs (in this
process, on 127.0.0.1); the clients are real client runtimes over gRPC.
In round 2, the first three cohort members to train fail (their model
raises; each runtime sends a ``ReportFailure``): three of a cohort of four
have dropped, and the job's fallback decides what the round does.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.config import Config, parse_config
from shoal.coordinator.server import CoordinatorParts
from shoal.core import Parameters
from shoal.telemetry import CohortDropped
from support.jobs import network_job, serve_to_digits_clients

TOKEN = "let-me-in"
CLIENTS = 8
PER_ROUND = 4
WAVE_ROUND = 2
FAILING = 3  # of the cohort of four: more than half


class Wave:
    """The first ``count`` trainings of the wave round fail, whoever runs them."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.lock = threading.Lock()

    def strikes(self, round_number: int) -> bool:
        with self.lock:
            if round_number != WAVE_ROUND or self.left == 0:
                return False
            self.left -= 1
            return True


class Struck(Client):
    """A digits client whose training fails when the wave strikes it."""

    def __init__(self, inner: Client, wave: Wave) -> None:
        self.inner = inner
        self.wave = wave

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        if self.wave.strikes(config.round):
            raise RuntimeError("the battery died")
        return self.inner.fit(parameters, config)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return self.inner.evaluate(parameters, config)


@pytest.fixture
def hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A ``module:function`` alert hook in a module of its own."""
    name = f"network_sink_{uuid.uuid4().hex[:8]}"
    module = "received = []\n\n\ndef take(alert):\n    received.append(alert)\n"
    (tmp_path / f"{name}.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"{name}:take"
    monkeypatch.delitem(sys.modules, name, raising=False)


def job(tmp_path: Path, fallback: str, hook: str) -> Config:
    return parse_config(
        network_job(
            tmp_path,
            run_id="wave",
            token=TOKEN,
            clients=CLIENTS,
            per_round=PER_ROUND,
            run={"name": "wave", "rounds": 3},
            round={"deadline_s": 60.0, "drop_fallback": fallback},
            alerts={"hooks": [hook]},
        )
    )


async def federation(
    tmp_path: Path, config: Config
) -> tuple[CoordinatorParts, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    wave = Wave(FAILING)
    parts = await serve_to_digits_clients(
        tmp_path,
        config,
        clients=CLIENTS,
        token=TOKEN,
        on_round=rows.append,
        wrap=lambda client: Struck(client, wave),
        timeout_s=120,
    )
    return parts, rows


def alerts_of(hook: str) -> list[CohortDropped]:
    """The cohort-dropped alerts the hook took (the playbook's alerts go to it too: a round
    whose accuracy a network run's timing left under the playbook's bar rolls back)."""
    received = sys.modules[hook.partition(":")[0]].received
    return [alert for alert in received if isinstance(alert, CohortDropped)]


def test_the_live_coordinator_reselects_replacements_when_most_of_a_cohort_fails(
    tmp_path: Path, hook: str
) -> None:
    _, rows = asyncio.run(federation(tmp_path, job(tmp_path, "reselect", hook)))
    assert [(row["round"], row["committed"]) for row in rows] == [(1, True), (2, True), (3, True)]
    wave = rows[1]
    fallback = wave["fallback"]
    assert (fallback["kind"], fallback["dropped"], fallback["cohort"]) == ("reselect", 3, 4)
    assert fallback["replacements"] == 3
    assert wave["selected"] == 7 and wave["reported"] == 4  # the target, by the replacements
    assert wave["failures"] == {"the battery died": 3}
    assert "fallback" not in rows[0] and "fallback" not in rows[2]
    [alert] = alerts_of(hook)
    assert (alert.run_id, alert.round, alert.fallback, alert.replacements, alert.committed) == (
        "wave",
        WAVE_ROUND,
        "reselect",
        3,
        True,
    )


def test_the_live_coordinator_aborts_the_round_at_once_and_keeps_the_model(
    tmp_path: Path, hook: str
) -> None:
    parts, rows = asyncio.run(federation(tmp_path, job(tmp_path, "abort", hook)))
    assert [(row["round"], row["committed"]) for row in rows] == [(1, True), (2, False), (3, True)]
    wave = rows[1]
    assert wave["fallback"]["kind"] == "abort" and wave["selected"] == PER_ROUND
    assert "the round is aborted and the model kept" in wave["abort_reason"]
    assert wave["model_version"] == rows[0]["model_version"]
    assert wave["virtual_time_s"] - rows[0]["virtual_time_s"] < 60.0  # not left to the deadline
    [alert] = alerts_of(hook)
    assert (alert.round, alert.fallback, alert.dropped, alert.committed) == (2, "abort", 3, False)
    summary = parts.run.finish()
    assert summary["fallbacks"] == {"abort": 1}
