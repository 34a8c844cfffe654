"""The in-process transport: a client runtime talks to a round driver by direct calls.

It is the network without the network, for tests and single-process demos:
the same client runtime and the same driver as a deployment, with optional
injected faults (every call may fail as a dropped connection would).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from shoal.client.runtime import Enrollment
from shoal.coordinator.driver import RoundDriver
from shoal.core.device import DeviceState
from shoal.core.errors import IntegrityError, NotFoundError, TransportError
from shoal.core.parameters import Parameters
from shoal.secure.serde import SecureReply
from shoal.tasks import CheckInAnswer, Offer, RejectSubmission, TaskOffer


class InProcessLink:
    """A :class:`~shoal.client.runtime.CoordinatorLink` that calls ``driver`` directly.

    ``models`` returns the global model with a given sha256 (the model store).
    ``failure_rate`` makes that share of calls raise TransportError, drawn
    from ``rng``, to exercise the runtime's retries.
    """

    def __init__(
        self,
        driver: RoundDriver,
        models: Callable[[str], Parameters],
        *,
        failure_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.driver = driver
        self.models = models
        self.failure_rate = failure_rate
        self.rng = rng or random.Random(0)
        self.enrolled: dict[str, DeviceState] = {}
        self.failures = 0

    def _network(self) -> None:
        if self.failure_rate and self.rng.random() < self.failure_rate:
            self.failures += 1
            raise TransportError("connection reset (injected)")

    async def enroll(self, enrollment: Enrollment, state: DeviceState) -> None:
        self._network()
        self.enrolled[enrollment.client_id] = state

    async def check_in(self, enrollment: Enrollment, state: DeviceState) -> CheckInAnswer:
        self._network()
        self.enrolled[enrollment.client_id] = state
        return self.driver.check_in(enrollment.client_id)

    async def fetch_model(self, enrollment: Enrollment, sha256: str) -> Parameters:
        self._network()
        try:
            model = self.models(sha256)
        except KeyError:
            raise NotFoundError(f"the coordinator has no model {sha256[:12]}...") from None
        if model.sha256() != sha256:
            raise IntegrityError(f"model {sha256[:12]}... does not hash to its name")
        return model

    async def submit_update(
        self,
        enrollment: Enrollment,
        offer: TaskOffer,
        update: Parameters,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> RejectSubmission | None:
        self._network()
        return self.driver.submit_update(
            enrollment.client_id, offer.round, update.vector, num_examples, metrics
        )

    async def submit_evaluation(
        self,
        enrollment: Enrollment,
        offer: TaskOffer,
        loss: float,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> RejectSubmission | None:
        self._network()
        return self.driver.submit_evaluation(
            enrollment.client_id, offer.round, loss, num_examples, metrics
        )

    async def submit_secure(
        self, enrollment: Enrollment, message: SecureReply
    ) -> RejectSubmission | None:
        self._network()
        return self.driver.submit_secure(enrollment.client_id, message.round, message)

    async def report_failure(self, enrollment: Enrollment, offer: Offer, reason: str) -> None:
        self._network()
        self.driver.report_failure(enrollment.client_id, offer.round, reason)
