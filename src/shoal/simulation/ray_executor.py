"""Runs clients' local work on a Ray cluster: one actor per worker, each caching its clients.

The local machine's Ray is started (and stopped) when no cluster is given;
``address`` joins an existing one ("auto", or "ray://head:10001"). Jobs are
split exactly as in the process pool, so a run gives the same results on
Ray, in a pool, or in one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from shoal.core.errors import MissingExtraError
from shoal.core.later import here
from shoal.core.parameters import Layout, Parameters, Vector
from shoal.simulation.executor import (
    Batch,
    ClientFactory,
    Deferred,
    Job,
    Outcome,
    ThreadsHeld,
    in_job_order,
    limit_blas_threads,
    run_job,
    split_by_worker,
)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError(
            extra="ray", package="ray", feature="the Ray simulation backend"
        ) from exc
    return ray


# Ray waits 30 s for a local head's GCS server to write its port; a loaded
# machine (a test suite on two cores) can take longer, and the run then fails
# before its first round. An operator's own setting wins.
GCS_PORT_WAIT_S = "180"


class ClientHost:
    """The body of one Ray actor: a client factory and the clients' cached data."""

    def __init__(self, factory: ClientFactory) -> None:
        self.factory = factory
        limit_blas_threads()

    def run(self, vector: Vector, layout: Layout, jobs: Sequence[Job]) -> list[Outcome]:
        parameters = Parameters(vector, layout)
        return [run_job(self.factory, parameters, job) for job in jobs]


class RayExecutor:
    """Spreads each batch over ``workers`` Ray actors, one chunk per actor."""

    def __init__(self, factory: ClientFactory, *, workers: int, address: str | None = None) -> None:
        self._ray = ray = _import_ray()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            os.environ.setdefault("RAY_gcs_server_port_wait_time_s", GCS_PORT_WAIT_S)
            ray.init(
                address=address,
                num_cpus=None if address else workers,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        actor = ray.remote(num_cpus=1)(ClientHost)
        self._actors = [actor.remote(factory) for _ in range(workers)]
        self._threads = ThreadsHeld(torch=False)  # the actors' cores are theirs

    def start(self, parameters: Parameters, jobs: Sequence[Job], *, ahead: bool = False) -> Batch:
        """The actors get their chunks now (``ahead`` changes nothing: this process trains
        none); the outcomes are waited for when asked."""
        del ahead
        ray = self._ray
        if not jobs:
            return Deferred(list)
        vector = ray.put(parameters.vector)
        chunks = split_by_worker(jobs, workers=len(self._actors))
        pending = [
            actor.run.remote(vector, parameters.layout, chunk)
            for actor, chunk in zip(self._actors, chunks, strict=True)
            if chunk
        ]
        # dropped, nothing is read: the actors finish their chunks, their outcomes unread
        return Deferred(lambda: in_job_order(jobs, ray.get(pending)))

    def run(self, parameters: Parameters, jobs: Sequence[Job]) -> list[Outcome]:
        return self.start(parameters, jobs).result()

    # here: what a Ray task beside the actors would save is not measured, so none is sent
    later = staticmethod(here)

    def close(self) -> None:
        try:
            for actor in self._actors:
                self._ray.kill(actor)
            if self._owns_ray:
                self._ray.shutdown()
        finally:
            self._threads.release()
