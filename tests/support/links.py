"""Links that watch what a client sends, for tests of what leaves a device."""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import grpc
import numpy as np

from shoal.client.link import Enrollment, Request, SubmitUpdate
from shoal.transport.grpc_link import GrpcLink

T = TypeVar("T")


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

    async def handle(self, enrollment: Enrollment, request: Request[T]) -> T:
        if isinstance(request, SubmitUpdate):  # a plaintext update, as it leaves
            upload = Upload(
                enrollment.client_id, request.update.vector.copy(), dict(request.metrics)
            )
            self.uploads.append(upload)
        return await super().handle(enrollment, request)
