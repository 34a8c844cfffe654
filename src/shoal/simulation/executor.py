"""Runs clients' local work, in this process or in a pool of worker processes.

An executor takes the global parameters and a batch of jobs and returns one
outcome per job, in order. A client that raises is an outcome with an error,
never a crash. Results do not depend on the executor: every job carries its
own seed, so serial and parallel runs are bit-for-bit identical.

A batch can be started before its outcomes are asked for (:meth:`Executor.start`): a pool
hands its workers their chunks at once, and this process trains its own chunk when the
outcomes are asked for. The simulator starts a round's batch while the round before it
commits its records (:meth:`shoal.coordinator.run.Run.close_round`, ``ahead``).
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import math
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, cast

import threadpoolctl

from shoal.client.api import Client, EvaluateConfig, FitConfig
from shoal.client.handler import run_evaluate, run_fit
from shoal.coordinator.selection import client_key
from shoal.core.errors import RunError
from shoal.core.later import Later, here
from shoal.core.parameters import Layout, Parameters, Vector
from shoal.core.pickling import pickled_by_fields
from shoal.forkserver import forkserver_context
from shoal.simulation.balance import Balance
from shoal.simulation.population import packed, unpacked

log = logging.getLogger("shoal.simulation")
T = TypeVar("T")

ClientFactory = Callable[[str], Client]


@pickled_by_fields  # to and from the workers, each round
@dataclass(frozen=True, slots=True)
class Job:
    """One client's task: train with a FitConfig or evaluate with an EvaluateConfig.

    ``seeded_noise``: the client's DP noise from the task's seed, reproducible;
    the simulator's choice (``privacy.secure_noise = false``), never a task's.
    ``residual``: what the client's last compressed upload left out (its device's own
    memory, which the simulator keeps for it).
    """

    client_id: str
    config: FitConfig | EvaluateConfig
    seeded_noise: bool = False
    residual: Vector | None = None


@pickled_by_fields  # to and from the workers, each round
@dataclass(frozen=True, slots=True)
class Outcome:
    """One client's answer: an update, or a loss, or the error it raised; a compressed
    update's upload size and the residual its client keeps."""

    client_id: str
    num_examples: int = 0
    update: Vector | None = None
    loss: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    upload_bytes: int | None = None  # None: the update as it is (the model's size)
    residual: Vector | None = None


def run_job(factory: ClientFactory, parameters: Parameters, job: Job) -> Outcome:
    """Run one job against a fresh client; exceptions become an errored outcome."""
    try:
        client = factory(job.client_id)
        if isinstance(job.config, FitConfig):
            fit = run_fit(
                client,
                parameters,
                job.config,
                seeded_noise=job.seeded_noise,
                residual=job.residual,
            )
            return Outcome(
                job.client_id,
                fit.num_examples,
                update=fit.update,
                metrics=fit.metrics,
                upload_bytes=None if fit.payload is None else len(fit.payload),
                residual=fit.residual,
            )
        evaluation = run_evaluate(client, parameters, job.config)
        return Outcome(
            job.client_id, evaluation.num_examples, loss=evaluation.loss, metrics=evaluation.metrics
        )
    except Exception as exc:  # a client's failure is the client's, never the run's
        log.debug("client %s failed: %s", job.client_id, exc)  # the round's summary counts it
        detail = "".join(traceback.format_exception_only(exc)).strip()
        return Outcome(job.client_id, error=detail)


class Batch(Protocol):
    """A batch of jobs under way (:meth:`Executor.start`)."""

    def result(self) -> list[Outcome]:
        """The outcomes, in the jobs' order (this process trains its own share now)."""
        ...

    def drop(self) -> None:
        """The outcomes are not needed: nothing more is trained for them here, and what
        the workers send back is read and thrown away."""
        ...


class Executor(Protocol):
    """Runs batches of jobs; ``later`` runs the coordinator's side work (an
    :data:`~shoal.core.later.Offload`: in a worker the round leaves idle, or here); ``close``
    releases any workers."""

    def start(self, parameters: Parameters, jobs: Sequence[Job], *, ahead: bool = False) -> Batch:
        """Start a batch: the outcomes come from the returned batch, which this process
        must take (or drop) before it starts another. ``ahead``: this process has other work
        to do before it asks (a pool then gives it a smaller chunk of its own)."""
        ...

    def run(self, parameters: Parameters, jobs: Sequence[Job]) -> list[Outcome]:
        """A batch started and its outcomes taken at once."""
        ...

    def later(self, function: Callable[..., T], /, *args: Any) -> Later[T]: ...

    def close(self) -> None: ...


@pickled_by_fields  # to a worker, each round
@dataclass(frozen=True, slots=True)
class SideTask:
    """A function of the coordinator's and its arguments, for a worker to run between chunks."""

    function: Callable[..., Any]
    args: tuple[Any, ...]

    def run(self) -> Any:
        return self.function(*self.args)


class ThreadsHeld:
    """This process's BLAS and OpenMP thread pools (and PyTorch's, with ``torch``) held to one
    thread until :meth:`release` gives the counts before back.

    Every executor holds them while it is open. In this process, a pool spun up for a
    client's small step costs more than the step. Beside workers, it is worse: OpenBLAS's
    threads spin for a while after each call of the coordinator's (an aggregate, the drift's
    products), and that spinning took one of two cores from the workers for as long as they
    trained (BENCHMARKS.md, "Simulation overhead").
    """

    def __init__(self, *, torch: bool) -> None:
        self._limits = threadpoolctl.threadpool_limits(limits=1)
        self._torch_threads = _limit_torch_threads() if torch else None

    def release(self) -> None:
        self._limits.restore_original_limits()
        if self._torch_threads is not None:
            sys.modules["torch"].set_num_threads(self._torch_threads)


class SerialExecutor:
    """Runs every job in this process, one after another, on one thread (PyTorch's too):
    clients' small models train fastest that way; see :class:`ThreadsHeld`."""

    def __init__(self, factory: ClientFactory) -> None:
        self.factory = factory
        self._threads = ThreadsHeld(torch=True)

    def start(self, parameters: Parameters, jobs: Sequence[Job], *, ahead: bool = False) -> Batch:
        del ahead  # one process: every job waits for whatever it does first
        return Deferred(lambda: self.run(parameters, jobs))

    def run(self, parameters: Parameters, jobs: Sequence[Job]) -> list[Outcome]:
        return [run_job(self.factory, parameters, job) for job in jobs]

    later = staticmethod(here)  # one process: no other to lend (the engine sees it is here)

    def close(self) -> None:
        self._threads.release()


class Deferred:
    """A batch whose outcomes are made when they are first asked for (and kept); ``drop``
    makes none, and asking for them after it is an error."""

    __slots__ = ("_dropped", "_make", "_outcomes")

    def __init__(
        self, make: Callable[[], list[Outcome]], dropped: Callable[[], object] | None = None
    ) -> None:
        self._make: Callable[[], list[Outcome]] | None = make
        self._dropped = dropped
        self._outcomes: list[Outcome] | None = None

    def result(self) -> list[Outcome]:
        if self._make is not None:
            self._outcomes, self._make = self._make(), None
        if self._outcomes is None:
            raise RunError("a batch's outcomes were asked for after it was dropped")
        return self._outcomes

    def drop(self) -> None:
        if self._make is not None:
            self._make = None
            if self._dropped is not None:
                self._dropped()


def _limit_torch_threads() -> int | None:
    """One PyTorch thread if PyTorch is loaded (a user's app imported it); the count before."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    before = int(torch.get_num_threads())
    torch.set_num_threads(1)
    return before


_worker_factory: ClientFactory | None = None


def split_by_worker(
    jobs: Sequence[Job], *, workers: int, sizes: Sequence[int] | None = None
) -> list[list[Job]]:
    """One chunk per worker, none longer than an even share (rounded up), or than its own of
    ``sizes`` when given (they add up to the jobs). A client lands on its own worker (its key
    modulo the workers) while that worker has room, so that each worker builds and caches the
    data of its own share of the population, give or take a few; the jobs past a worker's
    room (its last ones) go to the workers with room.

    A round's cohort falls unevenly on the workers' shares (ten clients on two workers: six
    or more on one in three rounds of four), and the round waits for the longest chunk:
    a client's data built twice, once in a while, costs less."""
    if sizes is None:
        rooms = [-(-len(jobs) // workers)] * workers
    elif len(sizes) != workers or sum(sizes) != len(jobs) or min(sizes) < 0:
        raise ValueError(f"{workers} chunk sizes adding up to {len(jobs)} needed, got {sizes}")
    else:
        rooms = list(sizes)
    chunks: list[list[Job]] = [[] for _ in range(workers)]
    for job in jobs:
        chunks[client_key(job.client_id) % workers].append(job)
    past = zip(chunks, rooms, strict=True)
    surplus = iter([job for chunk, room in past for job in chunk[room:]])
    for chunk, room in zip(chunks, rooms, strict=True):
        del chunk[room:]
        chunk.extend(itertools.islice(surplus, room - len(chunk)))
    return chunks


def in_job_order(jobs: Sequence[Job], chunks: Sequence[Sequence[Outcome]]) -> list[Outcome]:
    """The outcomes of the chunks, back in the order of the jobs."""
    by_client = {outcome.client_id: outcome for chunk in chunks for outcome in chunk}
    return [by_client[job.client_id] for job in jobs]


def limit_blas_threads() -> None:
    """Workers already use every core: a BLAS thread pool inside each would oversubscribe them."""
    threadpoolctl.threadpool_limits(limits=1)


def _start_worker(packed_factory: bytes, search_path: Sequence[str]) -> None:
    global _worker_factory
    _worker_factory = unpacked(packed_factory, search_path)
    limit_blas_threads()
    _limit_torch_threads()  # the app's module, just unpickled, may have imported PyTorch


def _run_chunk(vector: Vector, layout: Layout, jobs: Sequence[Job]) -> tuple[list[Outcome], float]:
    """The chunk's outcomes, and the seconds they took here (for :class:`Balance`)."""
    if _worker_factory is None:
        raise RuntimeError("worker started without a client factory")
    started = time.perf_counter()
    parameters = Parameters(vector, layout)
    outcomes = [run_job(_worker_factory, parameters, job) for job in jobs]
    return outcomes, time.perf_counter() - started


def _serve(connection: Connection, packed_factory: bytes, search_path: Sequence[str]) -> None:
    """A worker process: start (unpack the client factory), say so, then train each chunk that
    comes down ``connection`` and send its outcomes back, until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    try:
        _start_worker(packed_factory, search_path)
    except BaseException as exc:  # the app does not load here: the coordinator says why
        connection.send((False, _failure(exc)))
        return
    connection.send((True, None))
    while True:
        try:
            message = connection.recv_bytes()
        except EOFError:  # the coordinator is gone
            return
        try:  # sent as one message, pickled whole before any of it is written
            # unpickled in here: a message naming what this worker cannot import (a side
            # task's function from a module found after it started) fails alone
            work = pickle.loads(message)
            if work is None:
                return
            reply = work.run() if isinstance(work, SideTask) else _run_chunk(*work)
            connection.send((True, reply))
        except BaseException as exc:  # run_job keeps a client's own failures: this is ours
            connection.send((False, _failure(exc)))


def _failure(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()


_CLOSE_WAIT_S = 10.0  # the longest a worker being closed is waited for before it is ended


def _stop_worker(process: BaseProcess, connection: Connection) -> None:
    connection.close()
    process.join(timeout=_CLOSE_WAIT_S)
    if process.is_alive():
        process.terminate()
        process.join()


class WorkerProcess:
    """One worker process fed through its own pipe: this process writes a chunk down it and
    reads the outcomes back itself.

    ``ProcessPoolExecutor`` hands both to helper threads (a manager, a queue's feeder), and
    each wakes and then waits for Python's lock, which this process keeps while it trains its
    own chunk: a 1,000/100 round's chunk reached its worker 0.9 ms after it was handed over,
    and its outcomes came back 0.8 ms after the worker was done.
    """

    def __init__(self, context: ForkServerContext, packed_factory: bytes, search_path: list[str]):
        mine, theirs = context.Pipe()
        # not a daemon, as ProcessPoolExecutor's workers are not: a client may start processes
        # of its own (a PyTorch DataLoader's workers)
        self._process = context.Process(target=_serve, args=(theirs, packed_factory, search_path))
        self._process.start()
        theirs.close()  # the worker's end lives in the worker alone: its exit closes the pipe
        self._connection = mine
        # whoever waits for each reply still to come, in order: None for a chunk's (or the
        # start's), read by result(); a side task's Later, which its own result() settles
        self._awaited: collections.deque[WorkerLater[Any] | None] = collections.deque([None])
        self._chunk_replies: collections.deque[tuple[bool, object]] = collections.deque()
        # stopped at the latest when this is collected, or when Python exits: registered after
        # multiprocessing's own exit function, which waits for every child, this runs before
        # it (closed, the pipe ends the worker's wait for a chunk)
        self._stop = weakref.finalize(self, _stop_worker, self._process, mine)
        atexit.register(self._stop)

    def submit(self, vector: Vector, layout: Layout, jobs: Sequence[Job]) -> None:
        try:
            self._connection.send((vector, layout, list(jobs)))
        except OSError as exc:  # a worker that died took its end of the pipe with it
            raise self._died() from exc
        self._awaited.append(None)

    def submit_task(self, task: SideTask) -> Later[Any]:
        """Run ``task`` once this worker is done with what it has; its value comes later (at
        once, from here, for a task that does not pickle)."""
        try:
            message = pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)  # no handles in it
        except Exception:  # a function not importable by name (a lambda, a closure)
            return here(task.run)
        later: WorkerLater[Any] = WorkerLater(self, task)
        try:
            self._connection.send_bytes(message)  # read by the worker's recv() as it is
        except OSError as exc:
            raise self._died() from exc
        self._awaited.append(later)
        return later

    def answered(self) -> bool:
        """Whether the next chunk's reply is here already (reading it would not wait)."""
        try:
            while not self._chunk_replies:
                if not self._connection.poll():
                    return False
                self.read_reply()  # a side task's, ahead of it
            return True
        except (RunError, EOFError, OSError):
            return True  # dead: reading says so at once

    def result(self) -> object:
        """The next chunk's reply: its outcomes (or None, the worker's start)."""
        while not self._chunk_replies:
            self.read_reply()
        ok, value = self._chunk_replies.popleft()
        if not ok:
            raise RunError(f"a simulation worker process failed: {value}")
        return value

    def read_reply(self) -> None:
        """Read the next reply and hand it to whoever waits for it."""
        try:
            reply = self._connection.recv()
        except (EOFError, OSError) as exc:
            raise self._died() from exc
        awaited = self._awaited.popleft()
        if awaited is None:
            self._chunk_replies.append(reply)
        else:
            awaited.settle(reply)

    def close(self) -> None:
        try:
            # a chunk or a side task still under way (the batch was interrupted, a side
            # task's value never asked for): its reply, unread
            while self._awaited and self._connection.poll(_CLOSE_WAIT_S):
                self.read_reply()
            self._connection.send(None)
        except (RunError, OSError):
            pass  # dead, failing or stuck: it is stopped below all the same
        self._stop()
        atexit.unregister(self._stop)

    def _died(self) -> RunError:
        self._process.join(timeout=1)
        return RunError(
            f"a simulation worker process (pid {self._process.pid}) exited with code "
            f"{self._process.exitcode} while working: the run stops here; "
            + (_unguarded_script_hint() or "rerun with simulation.workers = 0 to see the failure")
        )


def _unguarded_script_hint() -> str | None:
    """What to do when this process runs a script: each worker imports it (as Python's
    process pools do), and one without a main guard starts the simulation again there (it
    died on the run folder's lock, and "workers = 0" was the wrong advice)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    if path is None or not str(path).endswith(".py") or spec is not None:
        return None  # `shoal`, `python -m ...`, a notebook or `python -`: nothing imported again
    return (
        f"each worker imports {Path(path).name}, so a script that starts a simulation must do "
        'so under `if __name__ == "__main__":` (or set simulation.workers = 0)'
    )


class WorkerLater(Generic[T]):
    """A side task's value from a worker (:meth:`WorkerProcess.submit_task`). Where the task
    failed there, or the worker died, the task runs here instead: its value is the same
    (the task is a pure function of its arguments) and so is its error, raised here."""

    __slots__ = ("_reply", "_task", "_worker")

    def __init__(self, worker: WorkerProcess, task: SideTask) -> None:
        self._worker = worker
        self._task = task
        self._reply: tuple[bool, object] | None = None

    def settle(self, reply: tuple[bool, object]) -> None:
        self._reply = reply

    def result(self) -> T:
        while self._reply is None:
            try:
                self._worker.read_reply()
            except RunError:  # the worker is gone; the next batch says so
                self._reply = (False, None)
        ok, value = self._reply
        if not ok:
            value = self._task.run()
            self._reply = (True, value)
        return cast(T, value)


class ProcessExecutor:
    """Spreads each batch over up to ``workers`` shares: up to ``workers - 1`` worker processes
    and this process, one chunk each (:func:`split_by_worker`), sized so that each takes about
    as long (:attr:`balance`: each process's seconds per job lately, a worker's with its pipe's
    round trip; at 100 clients and 10 a round, this process ends up training 9 of the 10).

    One worker starts with the pool (an app that does not load in a worker says so at once);
    the others start when a batch first has a job for each of them: ``workers = 1024``
    with batches of 10 jobs (10 clients a round) starts 9 worker processes, not 1023.

    This process trains its own chunk while the workers train theirs: it would otherwise
    wait for them, and its chunk needs no hop to a process and back, nor a process woken
    from sleep (a pool of two workers took 11.6 ms for a 1,000/100 round's batch after the
    coordinator's work, this process and one worker 9.7 ms). Each worker always gets its own
    chunk (:class:`WorkerProcess`), so it caches the data of its share alone. Workers come
    from a forkserver that has Shoal and NumPy imported, so they start fast and are safe
    beside threads (the progress bar has one). The client factory is sent once per worker,
    by value (an app defined in a notebook or a script works), the parameters once per
    chunk. This process's BLAS threads are held to one meanwhile (:class:`ThreadsHeld`), and
    PyTorch's while it trains its chunk; a PyTorch that a server app uses here keeps its
    own otherwise.
    """

    def __init__(
        self, factory: ClientFactory, *, workers: int, search_path: Sequence[str | Path] = ()
    ) -> None:
        if workers < 2:
            raise ValueError(f"a pool needs 2 or more workers (this process is one), got {workers}")
        self._context = forkserver_context()  # already running when `shoal simulate` started it
        self.factory = factory
        self.workers = workers
        self._packed_factory, self._search_path = packed(factory, search_path)
        self._workers: list[WorkerProcess] = []
        # chunks sized to each process's speed; a worker's time includes its pipe's round trip
        # (both grow with the workers)
        self.balance = Balance(1)
        self._round_trip_s = [0.0]
        self._start_workers(1)
        self._threads = ThreadsHeld(torch=False)
        self._next_side = itertools.count()  # side tasks go to the workers in turn
        self._open = False  # a batch started, its outcomes not yet taken

    @property
    def worker_processes(self) -> int:
        """How many worker processes this pool started beside this process: one at first,
        then as many as its largest batch had jobs for, up to ``workers - 1``."""
        return len(self._workers)

    def start(self, parameters: Parameters, jobs: Sequence[Job], *, ahead: bool = False) -> Batch:
        """Hand the workers their chunks now; this process trains its own when the outcomes
        are asked for (``ahead``: sized for the time it was busy before asking, lately)."""
        if self._open:
            raise RunError("a batch is under way: take its outcomes before starting another")
        if not jobs:
            return Deferred(list)
        self._start_workers(min(self.workers, len(jobs)) - 1)  # this process takes a job too
        sizes = self.balance.sizes(len(jobs), ahead=ahead)
        shares = len(self._workers) + 1
        mine, *theirs = split_by_worker(jobs, workers=shares, sizes=sizes)
        busy = []
        submitted = time.perf_counter()
        for index, (worker, chunk) in enumerate(zip(self._workers, theirs, strict=True), 1):
            if chunk:
                worker.submit(parameters.vector, parameters.layout, chunk)
                busy.append((index, worker, len(chunk)))
        self._open = True
        return Deferred(
            lambda: self._finish(parameters, jobs, mine, busy, submitted, ahead),
            dropped=lambda: self._drop(busy),
        )

    def run(self, parameters: Parameters, jobs: Sequence[Job]) -> list[Outcome]:
        return self.start(parameters, jobs).result()

    def _drop(self, busy: Sequence[tuple[int, WorkerProcess, int]]) -> None:
        """A batch's outcomes unneeded: the workers' read and thrown away, none trained here."""
        self._open = False
        for _, worker, _ in busy:
            worker.result()

    def _finish(
        self,
        parameters: Parameters,
        jobs: Sequence[Job],
        mine: Sequence[Job],
        busy: Sequence[tuple[int, WorkerProcess, int]],
        submitted: float,
        ahead: bool,
    ) -> list[Outcome]:
        """This process's chunk trained, the workers' outcomes read: the batch's outcomes."""
        self._open = False
        started = time.perf_counter()
        if ahead:
            self.balance.observe_busy(started - submitted)
        with _one_torch_thread():
            trained = [run_job(self.factory, parameters, job) for job in mine]
        self.balance.observe(0, jobs=len(mine), seconds=time.perf_counter() - started)
        outcomes: list[list[Outcome]] = [trained]
        for index, worker, count in busy:
            asked = time.perf_counter()
            waited = not worker.answered()
            chunk_outcomes, seconds = cast(tuple[list[Outcome], float], worker.result())
            # the chunk's round trip: exact when its reply came after this asked for it, and
            # at most the time until this asked when it was there already
            if waited:
                self._round_trip_s[index] = time.perf_counter() - submitted - seconds
            else:
                bound = asked - submitted - seconds
                self._round_trip_s[index] = max(0.0, min(self._round_trip_s[index], bound))
            self.balance.observe(index, jobs=count, seconds=seconds + self._round_trip_s[index])
            outcomes.append(chunk_outcomes)
        return in_job_order(jobs, outcomes)

    def later(self, function: Callable[..., T], /, *args: Any) -> Later[T]:
        """``function(*args)`` in a worker process, once it is done with its chunk: between a
        round's batches the workers wait, and the coordinator's side work (a round's divergence
        and drift) runs there while this process goes on with the round."""
        worker = self._workers[next(self._next_side) % len(self._workers)]
        later: Later[T] = worker.submit_task(SideTask(function, args))
        return later

    def close(self) -> None:
        if self.worker_processes + 1 < self.workers:
            log.info(
                "simulation.workers = %d: %d of the %d processes ran (this one among them), "
                "no batch had jobs for more",
                self.workers,
                self.worker_processes + 1,
                self.workers,
            )
        try:
            self._shut_down()
        finally:
            self._threads.release()

    def _start_workers(self, count: int) -> None:
        """Start worker processes until ``count`` run beside this one; the chunks are even
        again until every process is timed. One that fails to start fails this call."""
        if count <= len(self._workers):
            return
        started: list[WorkerProcess] = []
        try:
            with _main_without_phantom_file():
                for _ in range(count - len(self._workers)):
                    started.append(
                        WorkerProcess(self._context, self._packed_factory, self._search_path)
                    )
                for worker in started:
                    worker.result()  # started, the app unpacked
        except BaseException:
            for worker in started:
                worker.close()
            raise
        self._workers.extend(started)
        self.balance = Balance(len(self._workers) + 1)
        self._round_trip_s.extend([0.0] * len(started))

    def _shut_down(self) -> None:
        for worker in self._workers:
            worker.close()


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """PyTorch held to one thread in this process for the block, if a user's app loaded it."""
    before = _limit_torch_threads()
    try:
        yield
    finally:
        if before is not None and before != 1:
            sys.modules["torch"].set_num_threads(before)


@contextmanager
def _main_without_phantom_file() -> Iterator[None]:
    """Start workers from ``python -`` too: its ``__main__`` names a file (``<stdin>``) that
    is not there, which a worker would try to run; the app comes by value instead."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or Path(path).is_file():
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def make_executor(
    factory: ClientFactory,
    *,
    workers: int,
    backend: str = "local",
    ray_address: str | None = None,
    search_path: Sequence[str | Path] = (),
) -> Executor:
    """Ray actors with ``backend="ray"``; else, for ``workers`` >= 2, up to ``workers - 1``
    worker processes beside this one, and in-process execution below that.

    A local pool is no wider than this machine's CPUs (:func:`os.cpu_count`): a process past
    them only waits for a core. Its workers start as batches have jobs for them
    (:class:`ProcessExecutor`)."""
    if backend == "ray":
        from shoal.simulation.ray_executor import RayExecutor

        return RayExecutor(factory, workers=max(1, workers), address=ray_address)
    workers = _within_cpus(workers)
    if workers >= 2:
        return ProcessExecutor(factory, workers=workers, search_path=search_path)
    return SerialExecutor(factory)


def _within_cpus(workers: int) -> int:
    """``workers``, or this machine's CPU count where that is fewer (and known); logged."""
    cpus = os.cpu_count()
    if cpus is None or workers <= cpus:
        return workers
    log.info(
        "simulation.workers = %d, but this machine has %d CPUs: the pool uses %d processes",
        workers,
        cpus,
        cpus,
    )
    return cpus
