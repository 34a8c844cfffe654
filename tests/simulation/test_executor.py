"""Executors: a client's exception is an outcome, and serial equals parallel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import threadpoolctl

from shoal.apps.builtin import DataScenario
from shoal.client.api import Client, EvaluateConfig, FitConfig
from shoal.coordinator.selection import client_key
from shoal.core import MissingExtraError, Parameters, RunError
from shoal.simulation.executor import (
    Job,
    ProcessExecutor,
    SerialExecutor,
    make_executor,
    run_job,
    split_by_worker,
)
from support.jobs import bare_config
from support.whereabouts import (
    DiesAwayFromHome,
    ParentClient,
    Unloadable,
    WhereaboutsClient,
    exits_away_from_home,
    fails_away_from_home,
    fails_everywhere,
    where_doubled,
)


def broken_factory(client_id: str) -> Client:
    raise MemoryError(f"{client_id} ran out of memory")


def test_a_raising_client_is_an_errored_outcome() -> None:
    scenario = DataScenario(bare_config(["data.num_clients=4", "round.clients_per_round=2"]))
    outcome = run_job(
        broken_factory, scenario.initial_parameters(), Job("client-00000", FitConfig(round=1))
    )
    assert outcome.error is not None and "out of memory" in outcome.error
    assert outcome.update is None


def test_a_dropped_batch_cannot_be_read_and_the_pool_goes_on() -> None:
    """A batch dropped with side tasks queued before, between and after: each side task's
    value and the next batch's outcomes come back to their own askers."""
    scenario = DataScenario(bare_config(["data.num_clients=8", "round.clients_per_round=4"]))
    parameters = scenario.initial_parameters()
    jobs = [Job(client, FitConfig(round=1)) for client in scenario.client_ids[:4]]
    pool = ProcessExecutor(scenario.build_client, workers=2)
    try:
        before = pool.later(sum, [1, 2])
        batch = pool.start(parameters, jobs)
        between = pool.later(sum, [3, 4])
        batch.drop()
        with pytest.raises(RunError, match="after it was dropped"):
            batch.result()
        after = pool.later(sum, [5, 6])
        outcomes = pool.run(parameters, jobs)
        assert [outcome.client_id for outcome in outcomes] == [job.client_id for job in jobs]
        assert all(outcome.error is None for outcome in outcomes)
        assert (before.result(), between.result(), after.result()) == (3, 7, 11)
    finally:
        pool.close()


def test_serial_and_process_executors_agree() -> None:
    scenario = DataScenario(bare_config(["data.num_clients=8", "round.clients_per_round=4"]))
    parameters = scenario.initial_parameters()
    jobs = [
        Job(client, FitConfig(round=1, epochs=2, seed=index))
        for index, client in enumerate(scenario.client_ids)
    ]
    jobs.append(Job(scenario.client_ids[0], EvaluateConfig(round=1)))
    jobs.pop(0)
    executor = SerialExecutor(scenario.build_client)
    try:
        serial = executor.run(parameters, jobs)
    finally:
        executor.close()
    pool = ProcessExecutor(scenario.build_client, workers=2)
    try:
        parallel = pool.run(parameters, jobs)
        assert pool.run(parameters, []) == []
    finally:
        pool.close()
    assert [outcome.client_id for outcome in parallel] == [job.client_id for job in jobs]
    for one, other in zip(serial, parallel, strict=True):
        assert one.error is None and other.error is None
        assert one.num_examples == other.num_examples and one.metrics == other.metrics
        if one.update is not None:
            np.testing.assert_array_equal(one.update, other.update)  # type: ignore[arg-type]


def _blas_threads() -> set[int]:
    return {
        pool["num_threads"]
        for pool in threadpoolctl.threadpool_info()
        if pool["user_api"] == "blas"
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_an_open_executor_holds_this_process_to_one_blas_thread(workers: int) -> None:
    """Beside workers, the coordinator's BLAS threads spun for a while after each of its calls
    and took a core from the workers as they trained: held to one while the executor is open,
    the count before given back on close."""
    scenario = DataScenario(bare_config(["data.num_clients=4", "round.clients_per_round=2"]))
    np.ones((64, 64)) @ np.ones((64, 64))  # numpy's BLAS is loaded
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert _blas_threads() == {2}
        executor = make_executor(scenario.build_client, workers=workers)
        try:
            assert isinstance(executor, ProcessExecutor if workers else SerialExecutor)
            assert _blas_threads() == {1}
            executor.run(
                scenario.initial_parameters(), [Job(scenario.client_ids[0], FitConfig(round=1))]
            )
            assert _blas_threads() == {1}
        finally:
            executor.close()
        assert _blas_threads() == {2}


def test_ray_backend_without_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'shoal\[ray\]'"):
        make_executor(broken_factory, workers=2, backend="ray")


@pytest.mark.parametrize("workers", [2, 3])
def test_a_batch_splits_into_even_chunks_each_client_on_its_own_worker_while_it_has_room(
    workers: int,
) -> None:
    for size in (1, 7, 10, 100):
        jobs = [Job(f"client-{index:04d}", FitConfig(round=1)) for index in range(0, 3 * size, 3)]
        chunks = split_by_worker(jobs, workers=workers)
        assert sorted(job.client_id for chunk in chunks for job in chunk) == sorted(
            job.client_id for job in jobs
        )  # each job once
        room = -(-size // workers)
        assert all(len(chunk) <= room for chunk in chunks)
        homes = [client_key(job.client_id) % workers for job in jobs]
        at_home = sum(
            client_key(job.client_id) % workers == index
            for index, chunk in enumerate(chunks)
            for job in chunk
        )
        # only the jobs past their own worker's room moved
        assert at_home == sum(min(homes.count(index), room) for index in range(workers))


def test_a_pool_of_n_trains_on_n_minus_one_workers_and_this_process_each_chunk_on_its_own() -> None:
    parameters = Parameters.from_arrays([np.zeros(3, np.float32)])
    jobs = [Job(f"client-{index:03d}", FitConfig(round=1)) for index in range(30)]
    pool = ProcessExecutor(WhereaboutsClient, workers=3)
    try:
        # chunk k runs on worker k every time (this process is chunk 0), never on whichever
        # worker is free: each worker caches the data of its own share
        placements = []
        for batch in (jobs, jobs[::-1], jobs[:7]):
            sizes = pool.balance.sizes(len(batch))  # even, then each process's speed's
            pids = {o.client_id: o.metrics["pid"] for o in pool.run(parameters, batch)}
            chunks = split_by_worker(batch, workers=3, sizes=sizes)
            placements.append([{pids[job.client_id] for job in chunk} for chunk in chunks])
    finally:
        pool.close()
    first = placements[0]
    assert all(len(where) == 1 for where in first) and len(set.union(*first)) == 3
    assert first[0] == {float(os.getpid())}
    assert placements[1] == first and placements[2] == first
    with pytest.raises(ValueError, match="2 or more workers"):
        ProcessExecutor(WhereaboutsClient, workers=1)


def test_a_worker_that_dies_mid_chunk_stops_the_batch_with_its_exit_code() -> None:
    parameters = Parameters.from_arrays([np.zeros(3, np.float32)])
    jobs = [Job(f"client-{index:03d}", FitConfig(round=1)) for index in range(6)]
    pool = ProcessExecutor(DiesAwayFromHome(home=os.getpid()), workers=2)
    try:
        with pytest.raises(RunError, match=r"exited with code 3 .*simulation.workers = 0"):
            pool.run(parameters, jobs)
    finally:
        pool.close()  # returns: nothing waits on the dead worker


def test_an_app_that_does_not_load_in_a_worker_is_one_error_naming_why() -> None:
    with pytest.raises(RunError, match="worker process failed: ImportError: no module named"):
        ProcessExecutor(Unloadable(), workers=3)


def test_a_client_in_a_worker_may_start_processes_of_its_own() -> None:
    parameters = Parameters.from_arrays([np.zeros(3, np.float32)])
    jobs = [Job(f"client-{index:03d}", FitConfig(round=1)) for index in range(6)]
    pool = ProcessExecutor(ParentClient, workers=2)
    try:
        outcomes = pool.run(parameters, jobs)
    finally:
        pool.close()
    assert {outcome.metrics.get("pid") for outcome in outcomes} > {float(os.getpid())}
    assert all(outcome.error is None and outcome.metrics["exit"] == 0 for outcome in outcomes)


def test_python_exits_with_a_pool_left_open() -> None:
    script = (
        "import numpy as np\n"
        "from shoal.client.api import FitConfig\n"
        "from shoal.core import Parameters\n"
        "from shoal.simulation.executor import Job, ProcessExecutor\n"
        "from support.whereabouts import WhereaboutsClient\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessExecutor(WhereaboutsClient, workers=3)\n"
        "    parameters = Parameters.from_arrays([np.zeros(3, np.float32)])\n"
        "    jobs = [Job(f'c{i}', FitConfig(round=1)) for i in range(9)]\n"
        "    print(len(pool.run(parameters, jobs)))  # and no close\n"
    )
    tests = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["9"]


def test_side_work_runs_in_a_worker_between_batches_and_never_in_their_way() -> None:
    parameters = Parameters.from_arrays([np.zeros(3, np.float32)])
    jobs = [Job(f"client-{index:03d}", FitConfig(round=1)) for index in range(8)]
    pool = ProcessExecutor(WhereaboutsClient, workers=3)
    try:
        first = pool.later(where_doubled, 21)
        outcomes = pool.run(parameters, jobs)  # its reply comes before the batch's: kept
        assert [o.client_id for o in outcomes] == [job.client_id for job in jobs]
        assert all(o.error is None for o in outcomes)
        second, never_asked = pool.later(where_doubled, 5), pool.later(where_doubled, 7)
        pids = {o.metrics["pid"] for o in outcomes} - {float(os.getpid())}
        assert first.result() == (first.result()[0], 42) and float(first.result()[0]) in pids
        assert second.result()[1] == 10 and second.result()[0] != first.result()[0]  # in turn
        assert pool.run(parameters, jobs[:3])  # the unasked reply is no batch's
    finally:
        pool.close()  # and does not hold the close up
    assert never_asked.result()[1] == 14


def test_side_work_that_fails_in_a_worker_is_done_here_with_the_same_value_or_error() -> None:
    pool = ProcessExecutor(WhereaboutsClient, workers=2)
    try:
        assert pool.later(fails_away_from_home, os.getpid()).result() == os.getpid()
        with pytest.raises(ArithmeticError, match="broken here too"):
            pool.later(fails_everywhere, "broken here too").result()
        # a function a worker cannot import by name: here, at once
        assert pool.later(lambda: os.getpid()).result() == os.getpid()
    finally:
        pool.close()


def test_side_work_of_a_worker_that_died_is_done_here_and_the_next_batch_says_it_died() -> None:
    parameters = Parameters.from_arrays([np.zeros(3, np.float32)])
    pool = ProcessExecutor(WhereaboutsClient, workers=2)
    try:
        assert pool.later(exits_away_from_home, os.getpid()).result() == os.getpid()
        with pytest.raises(RunError, match="exited with code 3"):
            pool.run(parameters, [Job(f"client-{index}", FitConfig(round=1)) for index in range(6)])
    finally:
        pool.close()


def test_side_work_in_one_process_is_done_at_once() -> None:
    executor = SerialExecutor(WhereaboutsClient)
    try:
        assert executor.later(where_doubled, 4).result() == (os.getpid(), 8)
        with pytest.raises(ArithmeticError, match="now"):
            executor.later(fails_everywhere, "now")  # raised as it is asked: nothing to wait on
    finally:
        executor.close()


def test_side_work_a_worker_cannot_import_is_done_here_and_the_worker_goes_on(
    tmp_path: Path,
) -> None:
    # a function that pickles by name here but whose module the worker never saw (this
    # process found it after the worker started): the worker says so and keeps serving
    parameters = Parameters.from_arrays([np.zeros(3, np.float32)])
    jobs = [Job(f"client-{index:03d}", FitConfig(round=1)) for index in range(6)]
    pool = ProcessExecutor(WhereaboutsClient, workers=2)
    (tmp_path / "found_later.py").write_text("import os\n\ndef pid():\n    return os.getpid()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import found_later

        assert pool.later(found_later.pid).result() == os.getpid()
        pids = {outcome.metrics["pid"] for outcome in pool.run(parameters, jobs)}
        assert len(pids) == 2  # the worker trained its chunk still
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("found_later", None)
        pool.close()
