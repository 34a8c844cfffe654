"""The client runtime end to end over the in-process transport: real clients, real driver."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np

from shoal.aggregation.strategy import make_strategy
from shoal.client.api import Client, FitConfig, FitResult
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import load_config
from shoal.coordinator import CommitVersion, Coordinator, RoundSettings
from shoal.coordinator.driver import DriverSettings, RoundDriver
from shoal.core import Parameters
from shoal.simulation.scenario import DataScenario
from shoal.transport.inprocess import InProcessLink
from shoal.transport.signing import generate_client_key

CLIENTS = 8


class Exploding(Client):
    """A client whose model fails on every fit."""

    def __init__(self, inner: Client) -> None:
        self.inner = inner

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        raise MemoryError("device out of memory")

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        return self.inner.evaluate(parameters, config)


async def federate(
    tmp_path: Path, *, rounds: int, failure_rate: float, exploding: int = 0
) -> tuple[list[CommitVersion], float]:
    scenario = DataScenario(
        load_config(None, [f"data.num_clients={CLIENTS}", "round.clients_per_round=4"])
    )
    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=4, quorum=0.5, deadline_s=5.0, epochs=2, learning_rate=0.2
        ),
        strategy=make_strategy("fedavg"),
        parameters=scenario.initial_parameters(),
        seed=0,
    )
    commits: list[CommitVersion] = []
    models = {coordinator.parameters.sha256(): coordinator.parameters}

    async def persist(commit: CommitVersion) -> None:
        commits.append(commit)
        models[commit.parameters.sha256()] = commit.parameters

    link_ids: list[str] = []
    driver = RoundDriver(
        coordinator,
        DriverSettings(rounds=rounds, retry_after_s=0.02),
        candidates=lambda: sorted(link_ids),
        persist=persist,
    )
    link = InProcessLink(
        driver, models.__getitem__, failure_rate=failure_rate, rng=random.Random(1)
    )
    runtimes = []
    for index, client_id in enumerate(scenario.client_ids):
        enrollment = load_or_create_enrollment(tmp_path / client_id, generate_client_key)
        link_ids.append(enrollment.client_id)
        client = scenario.build_client(client_id)
        if index < exploding:
            client = Exploding(client)
        runtimes.append(
            ClientRuntime(client, link, enrollment, backoff=Backoff(0.001, 0.01), seed=index)
        )
    tasks = [asyncio.create_task(runtime.run()) for runtime in runtimes]
    await asyncio.wait_for(driver.run(), timeout=60)
    for runtime in runtimes:
        runtime.stop()
    await asyncio.gather(*tasks)
    _, accuracy = scenario.evaluate_centrally(coordinator.parameters)
    return commits, accuracy


def test_clients_train_the_global_model(tmp_path: Path) -> None:
    commits, accuracy = asyncio.run(federate(tmp_path, rounds=4, failure_rate=0.0))
    assert [commit.round for commit in commits] == [1, 2, 3, 4]
    assert accuracy > 0.35  # from 10% (the zero model); live arrival order varies the path


def test_network_errors_are_retried_not_fatal(tmp_path: Path) -> None:
    commits, _ = asyncio.run(federate(tmp_path, rounds=3, failure_rate=0.3))
    assert [commit.round for commit in commits] == [1, 2, 3]


def test_a_failing_model_is_reported_and_the_rounds_go_on(tmp_path: Path) -> None:
    commits, _ = asyncio.run(federate(tmp_path, rounds=3, failure_rate=0.0, exploding=3))
    assert [commit.round for commit in commits] == [1, 2, 3]


def test_enrollment_survives_a_restart(tmp_path: Path) -> None:
    first = load_or_create_enrollment(tmp_path, generate_client_key)
    again = load_or_create_enrollment(tmp_path, generate_client_key)
    assert first == again
    assert (tmp_path / "enrollment.json").stat().st_mode & 0o777 == 0o600
    assert np.frombuffer(first.public_key, np.uint8).size == 32
