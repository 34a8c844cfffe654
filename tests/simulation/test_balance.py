"""Sharing a batch between a pool's processes by their measured speed."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.client.api import FitConfig
from shoal.core.parameters import Parameters
from shoal.simulation.balance import Balance
from shoal.simulation.executor import Job, ProcessExecutor, SerialExecutor, split_by_worker
from support.whereabouts import SlowAwayFromHome


def test_even_chunks_until_every_process_was_timed() -> None:
    balance = Balance(3)
    assert balance.sizes(9) is None
    balance.observe(0, jobs=3, seconds=0.003)
    balance.observe(1, jobs=0, seconds=1.0)  # no jobs: nothing learned
    assert balance.sizes(9) is None
    balance.observe(1, jobs=3, seconds=0.003)
    balance.observe(2, jobs=3, seconds=0.003)
    assert balance.sizes(9) == [3, 3, 3]


def test_a_faster_process_gets_more_and_every_process_at_least_one() -> None:
    balance = Balance(2)
    balance.observe(0, jobs=10, seconds=0.010)
    balance.observe(1, jobs=10, seconds=0.090)  # nine times slower
    assert balance.sizes(100) == [90, 10]
    assert balance.sizes(3) == [2, 1]  # one each while there are enough: each timed again
    assert balance.sizes(1) == [1, 0]
    assert balance.sizes(0) == [0, 0]


def test_one_slow_chunk_moves_the_shares_a_little() -> None:
    balance = Balance(2, smoothing=0.3)
    balance.observe(0, jobs=1, seconds=1.0)
    balance.observe(1, jobs=1, seconds=1.0)
    balance.observe(1, jobs=1, seconds=11.0)
    assert balance.seconds_per_job == (1.0, pytest.approx(4.0))


def test_a_batch_started_ahead_leaves_this_process_what_it_can_do_after_its_other_work() -> None:
    """This process (the first) is busy for a while before it trains a batch started ahead:
    its chunk is sized to end when the workers' do, none where they end first."""
    balance = Balance(2)
    balance.observe(0, jobs=10, seconds=0.010)  # 1 ms a job
    balance.observe(1, jobs=10, seconds=0.010)
    assert balance.sizes(10, ahead=True) == [5, 5]  # not busy yet: nothing to count
    balance.observe_busy(0.004)
    assert balance.sizes(10) == [5, 5]  # a batch asked for at once
    assert balance.sizes(10, ahead=True) == [3, 7]  # 4 ms, then 3 jobs; the worker's 7
    balance.observe_busy(0.500)  # one long pause (a caller's callback): not the next round's
    assert balance.sizes(10, ahead=True) == [3, 7]
    for _ in range(2):
        balance.observe_busy(0.050)  # busy longer than the worker's whole batch, lately
    assert balance.sizes(10, ahead=True) == [1, 9]  # one still, to be timed again
    assert balance.sizes(1, ahead=True) == [0, 1]


@given(
    seconds=st.lists(st.floats(1e-6, 10.0), min_size=1, max_size=5),
    count=st.integers(0, 500),
    busy=st.one_of(st.none(), st.floats(0.0, 100.0)),
)
def test_the_sizes_add_up_to_the_batch(
    seconds: list[float], count: int, busy: float | None
) -> None:
    balance = Balance(len(seconds))
    for index, value in enumerate(seconds):
        balance.observe(index, jobs=1, seconds=value)
    if busy is not None:
        balance.observe_busy(busy)
    sizes = balance.sizes(count, ahead=busy is not None)
    assert sizes is not None and sum(sizes) == count and min(sizes) >= 0
    if count >= len(seconds):
        assert min(sizes) >= 1


def test_bad_pools_and_smoothing_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one process"):
        Balance(0)
    with pytest.raises(ValueError, match="smoothing"):
        Balance(2, smoothing=0.0)


def test_chunks_of_given_sizes_keep_clients_at_home_while_there_is_room() -> None:
    jobs = [Job(f"client-{index:03d}", FitConfig(round=1)) for index in range(20)]
    chunks = split_by_worker(jobs, workers=2, sizes=[15, 5])
    assert [len(chunk) for chunk in chunks] == [15, 5]
    assert sorted(job.client_id for chunk in chunks for job in chunk) == sorted(
        job.client_id for job in jobs
    )
    even = split_by_worker(jobs, workers=2)
    # the small chunk keeps only clients of its own home, the large one takes the rest
    assert {job.client_id for job in chunks[1]} <= {job.client_id for job in even[1]}
    with pytest.raises(ValueError, match="adding up to 20"):
        split_by_worker(jobs, workers=2, sizes=[10, 9])
    with pytest.raises(ValueError, match="2 chunk sizes"):
        split_by_worker(jobs, workers=2, sizes=[20])


def test_a_pool_gives_its_slow_worker_less_and_the_outcomes_stay_the_same() -> None:
    parameters = Parameters.from_arrays([np.zeros(3, np.float32)])
    jobs = [Job(f"client-{index:03d}", FitConfig(round=1)) for index in range(20)]
    factory = SlowAwayFromHome(home=os.getpid(), seconds=0.004)
    serial = SerialExecutor(factory).run(parameters, jobs)
    expected = [(o.client_id, o.num_examples) for o in serial]
    pool = ProcessExecutor(factory, workers=2)
    try:
        for _ in range(4):
            outcomes = pool.run(parameters, jobs)
            assert [(o.client_id, o.num_examples) for o in outcomes] == expected
        sizes = pool.balance.sizes(len(jobs))
    finally:
        pool.close()
    assert sizes is not None and sizes[0] > sizes[1] >= 1
