"""The in-process transport: a client runtime talks to a round driver by direct calls.

It is the network without the network, for tests and single-process demos:
the same client runtime and the same driver as a deployment, with optional
injected faults (every call may fail as a dropped connection would).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar, cast

from shoal.client.link import (
    CheckIn,
    Enroll,
    Enrollment,
    FetchFeatures,
    FetchModel,
    ReportFailure,
    Request,
    SubmitEvaluation,
    SubmitSecure,
    SubmitUpdate,
)
from shoal.coordinator.driver import RoundDriver
from shoal.coordinator.events import Authentication
from shoal.core.device import DeviceState
from shoal.core.errors import IntegrityError, NotFoundError, TransportError
from shoal.core.parameters import Parameters
from shoal.features import FeatureModule

T = TypeVar("T")


class InProcessLink:
    """A :class:`~shoal.client.link.CoordinatorLink` that calls ``driver`` directly.

    ``models`` returns the global model with a given sha256 (the model store);
    ``features`` is the run's feature module (None: none). ``failure_rate``
    makes that share of calls raise TransportError, drawn from ``rng``, to
    exercise the runtime's retries.
    """

    def __init__(
        self,
        driver: RoundDriver,
        models: Callable[[str], Parameters],
        *,
        failure_rate: float = 0.0,
        rng: random.Random | None = None,
        features: FeatureModule | None = None,
    ) -> None:
        self.driver = driver
        self.models = models
        self.features = features
        self.failure_rate = failure_rate
        self.rng = rng or random.Random(0)
        self.enrolled: dict[str, DeviceState] = {}
        self.failures = 0

    def _network(self) -> None:
        if self.failure_rate and self.rng.random() < self.failure_rate:
            self.failures += 1
            raise TransportError("connection reset (injected)")

    async def handle(self, enrollment: Enrollment, request: Request[T]) -> T:
        """Carry ``request`` to the driver by a direct call; returns its answer."""
        self._network()
        client = enrollment.client_id
        driver = self.driver
        answer: object = None
        match request:
            case Enroll():
                self.enrolled[client] = request.state
            case CheckIn():
                self.enrolled[client] = request.state
                answer = driver.check_in(client)
            case FetchModel():
                answer = self._model(request.sha256)
            case FetchFeatures():
                answer = self._features(request.sha256)
            case SubmitUpdate():
                answer = driver.submit_update(
                    client,
                    request.offer.round,
                    request.update.vector,
                    request.num_examples,
                    request.metrics,
                    Authentication.IN_PROCESS,
                    upload_bytes=None if request.payload is None else len(request.payload),
                )
            case SubmitEvaluation():
                answer = driver.submit_evaluation(
                    client,
                    request.offer.round,
                    request.loss,
                    request.num_examples,
                    request.metrics,
                )
            case SubmitSecure():
                answer = driver.submit_secure(
                    client, request.message.round, request.message, Authentication.IN_PROCESS
                )
            case ReportFailure():
                driver.report_failure(client, request.offer.round, request.reason)
            case _:
                raise TypeError(f"not a request this link carries: {request!r}")
        return cast(T, answer)

    def _features(self, sha256: str | None) -> bytes | None:
        module = self.features
        if module is None and sha256 is None:
            return None
        if module is None or sha256 not in (None, module.sha256):
            raise NotFoundError(f"the coordinator has no feature module {sha256}")
        return module.wasm

    def _model(self, sha256: str) -> Parameters:
        try:
            model = self.models(sha256)
        except KeyError:
            raise NotFoundError(f"the coordinator has no model {sha256[:12]}...") from None
        if model.sha256() != sha256:
            raise IntegrityError(f"model {sha256[:12]}... does not hash to its name")
        return model
