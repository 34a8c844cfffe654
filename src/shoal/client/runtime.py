"""The client runtime: enroll once, then check in, train, upload, and come back, forever.

The runtime owns the loop a device runs: it keeps its enrollment (id and
Ed25519 key) in a state folder so that a restart of the device or of the
coordinator loses nothing, checks in with its device state, honours the
coordinator's "retry after N seconds", backs off exponentially with jitter
on network errors, downloads and verifies the global model only when it
changed, trains in a worker thread, and uploads the result. The transport is
a :class:`CoordinatorLink`: gRPC in deployments, a direct call in tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from shoal.client.api import Client, EvaluateConfig, FitConfig, fit_update
from shoal.coordinator.driver import RetryLater, TaskOffer
from shoal.coordinator.events import Phase, RejectSubmission
from shoal.core.device import DeviceState
from shoal.core.errors import ClientError, NotFoundError, TransportError
from shoal.core.parameters import Parameters

log = logging.getLogger("shoal.client")

T = TypeVar("T")
Upload = Awaitable[RejectSubmission | None]


class _Stopped(Exception):
    """Raised inside the runtime once ``stop()`` was called, to unwind a retry loop."""


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A client's durable identity: its id and its Ed25519 key pair."""

    client_id: str
    private_key: bytes = field(repr=False)
    public_key: bytes


class CoordinatorLink(Protocol):
    """What the runtime needs from a transport; every call may raise TransportError."""

    async def enroll(self, enrollment: Enrollment, state: DeviceState) -> None: ...

    async def check_in(
        self, enrollment: Enrollment, state: DeviceState
    ) -> TaskOffer | RetryLater: ...

    async def fetch_model(self, enrollment: Enrollment, sha256: str) -> Parameters: ...

    async def submit_update(
        self, enrollment: Enrollment, offer: TaskOffer, update: Parameters, num_examples: int,
        metrics: Mapping[str, float],
    ) -> RejectSubmission | None: ...  # fmt: skip

    async def submit_evaluation(
        self, enrollment: Enrollment, offer: TaskOffer, loss: float, num_examples: int,
        metrics: Mapping[str, float],
    ) -> RejectSubmission | None: ...  # fmt: skip

    async def report_failure(
        self, enrollment: Enrollment, offer: TaskOffer, reason: str
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential backoff ("full jitter"): a uniform draw below a growing cap."""

    base_s: float = 0.2
    cap_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2**attempt))


def load_or_create_enrollment(
    state_dir: Path, make_key: Callable[[], tuple[bytes, bytes]]
) -> Enrollment:
    """The enrollment kept in ``state_dir``, created (and kept) on first use."""
    path = state_dir / "enrollment.json"
    if path.exists():
        data = json.loads(path.read_text())
        return Enrollment(
            data["client_id"], bytes.fromhex(data["private_key"]), bytes.fromhex(data["public_key"])
        )
    private, public = make_key()
    enrollment = Enrollment(f"client-{os.urandom(8).hex()}", private, public)
    state_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    record = asdict(enrollment) | {"private_key": private.hex(), "public_key": public.hex()}
    partial.write_text(json.dumps(record))
    partial.chmod(0o600)
    partial.replace(path)
    return enrollment


class ClientRuntime:
    """Runs one client against a coordinator until ``stop()`` or ``max_tasks`` tasks."""

    def __init__(
        self,
        client: Client,
        link: CoordinatorLink,
        enrollment: Enrollment,
        *,
        device_state: Callable[[], DeviceState] = DeviceState,
        backoff: Backoff | None = None,
        seed: int | None = None,
    ) -> None:
        self.client = client
        self.link = link
        self.enrollment = enrollment
        self.device_state = device_state
        self.backoff = backoff or Backoff()
        self._rng = random.Random(seed)
        self._model: tuple[str, Parameters] | None = None
        self._stopping = asyncio.Event()
        self.tasks_done = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, max_tasks: int | None = None) -> None:
        """Enroll, then serve tasks; network errors are retried with backoff, never fatal."""
        try:
            await self._serve_until_stopped(max_tasks)
        except _Stopped:
            return

    async def _serve_until_stopped(self, max_tasks: int | None) -> None:
        await self._retrying(lambda: self.link.enroll(self.enrollment, self.device_state()))
        while not self._stopping.is_set() and (max_tasks is None or self.tasks_done < max_tasks):
            answer = await self._retrying(
                lambda: self.link.check_in(self.enrollment, self.device_state())
            )
            if isinstance(answer, RetryLater):
                await self._pause(answer.seconds * self._rng.uniform(0.8, 1.2))
                continue
            await self._serve(answer)

    async def _serve(self, offer: TaskOffer) -> None:
        try:
            model = await self._model_for(offer)
        except NotFoundError as exc:  # the round moved on while we were downloading
            log.info("task of round %d is stale: %s", offer.round, exc)
            return
        try:
            outcome = await asyncio.to_thread(self._work, offer, model)
        except Exception as exc:  # the user's model failed: tell the coordinator, keep going
            reason = str(exc) or type(exc).__name__
            log.warning("task of round %d failed: %s", offer.round, reason)
            await self._retrying(lambda: self.link.report_failure(self.enrollment, offer, reason))
            return
        rejection = await self._retrying(lambda: outcome(self))
        if rejection is not None:
            log.info("round %d rejected our result: %s", offer.round, rejection.reason.value)
        self.tasks_done += 1

    def _work(self, offer: TaskOffer, model: Parameters) -> Callable[[ClientRuntime], Upload]:
        """Run the task in a worker thread; returns the upload to perform."""
        if offer.phase is Phase.FIT:
            if not isinstance(offer.config, FitConfig):
                raise ClientError("a training task came without a FitConfig")
            result = self.client.fit(model, offer.config)
            update = fit_update(result, model)
            metrics = dict(result.metrics)
            return lambda runtime: runtime.link.submit_update(
                runtime.enrollment, offer, update, result.num_examples, metrics
            )
        config = (
            offer.config
            if isinstance(offer.config, EvaluateConfig)
            else EvaluateConfig(offer.round)
        )
        evaluation = self.client.evaluate(model, config)
        return lambda runtime: runtime.link.submit_evaluation(
            runtime.enrollment,
            offer,
            evaluation.loss,
            evaluation.num_examples,
            dict(evaluation.metrics),
        )

    async def _model_for(self, offer: TaskOffer) -> Parameters:
        """The global model of the task: the cached one, or a download verified by its sha256."""
        if self._model is None or self._model[0] != offer.model_sha256:
            model = await self._retrying(
                lambda: self.link.fetch_model(self.enrollment, offer.model_sha256)
            )
            self._model = (offer.model_sha256, model)
        return self._model[1]

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except TransportError as exc:
                if self._stopping.is_set():
                    raise _Stopped from exc
                delay = self.backoff.delay(attempt, self._rng)
                log.info("coordinator unreachable (%s); retrying in %.2fs", exc, delay)
                attempt += 1
                await self._pause(delay)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return
