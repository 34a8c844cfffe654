"""Links that watch what a client sends, for tests of what leaves a device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import grpc
import numpy as np

from shoal.client.runtime import Enrollment
from shoal.core import Parameters
from shoal.tasks import RejectSubmission, TaskOffer
from shoal.transport.grpc_link import GrpcLink


class Upload(NamedTuple):
    """A plaintext update as it left its client."""

    client_id: str
    update: np.ndarray
    metrics: dict[str, float]


class RecordingLink(GrpcLink):
    """A gRPC link that keeps every plaintext update its client uploads, as it leaves."""

    def __init__(
        self,
        target: str,
        uploads: list[Upload],
        *,
        enrollment_token: str,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__(target, credentials=credentials, enrollment_token=enrollment_token)
        self.uploads = uploads

    async def submit_update(
        self,
        enrollment: Enrollment,
        offer: TaskOffer,
        update: Parameters,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> RejectSubmission | None:
        self.uploads.append(Upload(enrollment.client_id, update.vector.copy(), dict(metrics)))
        return await super().submit_update(enrollment, offer, update, num_examples, metrics)
