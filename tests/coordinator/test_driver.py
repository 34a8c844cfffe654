"""The live driver: rounds over the asyncio clock with clients that pull work and push results."""

from __future__ import annotations

import asyncio

import numpy as np

from shoal.aggregation.strategy import make_strategy
from shoal.coordinator import CommitVersion, Coordinator, Phase, RejectReason, RoundSettings
from shoal.coordinator.driver import DriverSettings, RetryLater, RoundDriver, TaskOffer
from shoal.core import Parameters

SIZE = 3


def make_driver(
    *, clients: int, rounds: int, deadline_s: float = 5.0, evaluate_every: int = 0
) -> tuple[RoundDriver, list[CommitVersion], list[str]]:
    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=4, quorum=0.5, deadline_s=deadline_s, evaluation_clients=2
        ),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE, np.float32)]),
        seed=1,
    )
    persisted: list[CommitVersion] = []
    seen: list[str] = []

    async def persist(commit: CommitVersion) -> None:
        await asyncio.sleep(0)
        persisted.append(commit)

    driver = RoundDriver(
        coordinator,
        DriverSettings(rounds=rounds, evaluate_every=evaluate_every, retry_after_s=0.05),
        candidates=lambda: sorted(set(seen)),
        persist=persist,
    )
    return driver, persisted, seen


async def client(
    driver: RoundDriver, seen: list[str], client_id: str, *, value: float, stall: bool = False
) -> int:
    """A well-behaved client: checks in, trains (adds ``value``), submits; returns tasks done."""
    done = 0
    while True:
        seen.append(client_id)
        answer = driver.check_in(client_id)
        if isinstance(answer, RetryLater):
            if driver.coordinator.state.value == "finished":
                return done
            await asyncio.sleep(0.01)
            continue
        assert isinstance(answer, TaskOffer) and answer.deadline_in_s > 0
        if stall:
            await asyncio.sleep(10)  # never answers in time
            continue
        if answer.phase is Phase.FIT:
            rejection = driver.submit_update(
                client_id, answer.round, np.full(SIZE, value, np.float32), 10, {"loss": 1.0}
            )
        else:
            rejection = driver.submit_evaluation(client_id, answer.round, 0.5, 5, {"accuracy": 1.0})
        assert rejection is None
        done += 1


async def run_federation(
    driver: RoundDriver, seen: list[str], clients: list[tuple[str, float, bool]]
) -> None:
    tasks = [
        asyncio.create_task(client(driver, seen, name, value=value, stall=stall))
        for name, value, stall in clients
    ]
    await asyncio.wait_for(driver.run(), timeout=30)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_rounds_complete_and_every_commit_is_persisted_in_order() -> None:
    driver, persisted, seen = make_driver(clients=6, rounds=3, evaluate_every=2)
    federation = [(f"c{index}", 1.0, False) for index in range(6)]
    asyncio.run(run_federation(driver, seen, federation))
    assert [commit.round for commit in persisted] == [1, 2, 3]
    np.testing.assert_allclose(driver.coordinator.parameters.vector, 3.0)
    assert driver.coordinator.state.value == "finished"


def test_stalled_clients_are_cut_off_by_the_deadline() -> None:
    driver, persisted, seen = make_driver(clients=6, rounds=2, deadline_s=0.3)
    federation = [(f"c{index}", 2.0, index >= 3) for index in range(6)]  # half never answer
    asyncio.run(run_federation(driver, seen, federation))
    assert [commit.round for commit in persisted] == [1, 2]
    assert all(commit.summary.reported <= 3 for commit in persisted)


def test_late_and_unknown_submissions_are_rejected() -> None:
    async def scenario() -> None:
        driver, _, seen = make_driver(clients=4, rounds=1)
        seen.extend(["a", "b", "c", "d"])
        runner = asyncio.create_task(driver.run())
        await asyncio.sleep(0.01)
        stranger = driver.submit_update("zz", 1, np.zeros(SIZE, np.float32), 1, {})
        assert stranger is not None and stranger.reason is RejectReason.NOT_SELECTED
        for name in "abcd":
            answer = driver.check_in(name)
            if isinstance(answer, TaskOffer):
                driver.submit_update(name, 1, np.ones(SIZE, np.float32), 1, {})
        await asyncio.wait_for(runner, timeout=5)
        late = driver.submit_update("a", 1, np.ones(SIZE, np.float32), 1, {})
        assert late is not None and late.reason is RejectReason.LATE

    asyncio.run(scenario())
