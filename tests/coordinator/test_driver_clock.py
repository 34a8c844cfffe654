"""The live driver on an injected clock: deadlines pass in virtual time, nothing sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from shoal.aggregation.strategy import make_strategy
from shoal.coordinator import CommitVersion, Coordinator, RoundSettings, RoundSummary
from shoal.coordinator.driver import DriverSettings, RoundDriver
from shoal.coordinator.schedule import schedule
from shoal.core import Parameters
from shoal.tasks import RunFinished, TaskOffer

SIZE = 3


class VirtualClock:
    """Time that moves only when the test says; timers fire in order as it passes them."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self.cancelled: set[int] = set()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Any:
        order = next(self._order)
        heapq.heappush(self._timers, (when, order, callback, args))
        clock = self

        class Handle:
            def cancel(self) -> None:
                clock.cancelled.add(order)

        return Handle()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while self._timers and self._timers[0][0] <= self.now:
            _, order, callback, args = heapq.heappop(self._timers)
            if order not in self.cancelled:
                callback(*args)


def test_a_round_closes_at_its_deadline_in_virtual_time_without_sleeping() -> None:
    clock = VirtualClock()
    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=4, over_selection=1.0, quorum=0.5, deadline_s=3600.0
        ),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE, np.float32)]),
        seed=1,
    )
    closed: list[tuple[RoundSummary, CommitVersion | None]] = []

    async def on_closed(summary: RoundSummary, commit: CommitVersion | None) -> None:
        closed.append((summary, commit))

    driver = RoundDriver(
        coordinator,
        DriverSettings(retry_after_s=0.01, clock=clock),
        plays=schedule(rounds=1),
        candidates=lambda: ["a", "b", "c", "d"],
        on_closed=on_closed,
    )

    async def scenario() -> None:
        job = asyncio.create_task(driver.run())
        await asyncio.sleep(0)  # the round starts
        for client in ("a", "b"):  # two answer; c and d never do
            offer = driver.check_in(client)
            assert isinstance(offer, TaskOffer)
            assert offer.deadline_in_s == 3600.0  # measured on the virtual clock
            update = np.ones(SIZE, np.float32)
            assert driver.submit_update(client, offer.round, update, 5, {}) is None
        clock.advance(1800.0)
        await asyncio.sleep(0)
        assert closed == []  # half the deadline: still collecting
        offer = driver.check_in("c")
        assert isinstance(offer, TaskOffer) and offer.deadline_in_s == 1800.0
        clock.advance(1800.0)  # an hour has passed, in no time at all
        await asyncio.wait_for(job, timeout=5)

    asyncio.run(scenario())
    [(summary, commit)] = closed
    assert summary.reported == 2 and summary.closed_at == 4600.0
    assert commit is not None
    np.testing.assert_allclose(commit.parameters.vector, 1.0)
    assert isinstance(driver.check_in("a"), RunFinished)


def test_a_waiting_round_lists_its_clients_again_once_enough_newcomers_came() -> None:
    """A round short of k clients reads the registry again after k clients it did not list
    have checked in, not at every check-in: before, a round waiting for 1,000 clients listed
    them all at each of their check-ins, and most of the first round of a 1,000-client
    deployment went to that."""
    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=50, over_selection=1.0, quorum=1.0, deadline_s=3600.0
        ),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE, np.float32)]),
        seed=1,
    )
    seen: list[str] = []
    listings: list[int] = []  # how many clients each listing found

    def candidates() -> list[str]:
        listings.append(len(seen))
        return list(seen)

    async def on_closed(summary: RoundSummary, commit: CommitVersion | None) -> None:
        pass

    driver = RoundDriver(
        coordinator,
        DriverSettings(retry_after_s=600.0, clock=VirtualClock()),  # no listing on a beat here
        plays=schedule(rounds=1),
        candidates=candidates,
        on_closed=on_closed,
    )

    async def scenario() -> list[Any]:
        job = asyncio.create_task(driver.run())
        await asyncio.sleep(0)  # the round lists nobody and waits for 50
        for index in range(20):  # 20 arrive: the round, 50 short, lists nobody again
            seen.append(f"c{index}")
            driver.check_in(f"c{index}")
            await asyncio.sleep(0)
        for index in range(20):  # the same 20 again: no newcomer among them
            driver.check_in(f"c{index}")
            await asyncio.sleep(0)
        for index in range(20, 50):  # 30 newcomers: after the 30th, it lists again
            seen.append(f"c{index}")
            driver.check_in(f"c{index}")
            await asyncio.sleep(0)
        for _ in range(5):  # the round starts
            await asyncio.sleep(0)
        offers = [driver.check_in(f"c{index}") for index in range(50)]
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        return offers

    offers = asyncio.run(scenario())
    assert listings == [0, 50]
    assert all(isinstance(offer, TaskOffer) for offer in offers)
