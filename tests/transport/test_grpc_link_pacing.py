"""A stream's deadline is per part: a large model crosses a slow link as long as it moves.

Before, a download or an upload had one deadline for the whole stream (``timeout_s``,
60 s): a model whose transfer took longer than that could never be downloaded or
uploaded, however steadily it moved, and the client retried it for good. Here the
coordinator is a real gRPC server on 127.0.0.1 that sends or takes each chunk slowly,
and the link's deadline is half a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import numpy as np
import pytest

from shoal.client.link import Enrollment, FetchModel, SubmitUpdate
from shoal.core import Parameters
from shoal.core.errors import TransportError
from shoal.tasks import FitConfig, Phase, TaskOffer
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.chunks import chunk_payload
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.rpc import add_bytes_servicer
from shoal.transport.signing import generate_client_key

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S = 0.5
MODEL = Parameters.from_arrays([np.arange(2**21, dtype=np.float32)], names=["w"])  # 8 MiB
PAYLOAD = MODEL.to_bytes()
CHUNK = 256 * 1024


class Slow:
    """A coordinator that sends the model, and takes an upload, a chunk every ``pause_s``,
    and stops for good after ``stall_after`` chunks."""

    def __init__(self, *, pause_s: float, stall_after: int | None = None) -> None:
        self.pause_s = pause_s
        self.stall_after = stall_after
        self.taken = 0

    async def _pause(self, done: int) -> None:
        if self.stall_after is not None and done >= self.stall_after:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.pause_s)

    async def FetchModel(self, request: bytes, context: Any) -> AsyncIterator[pb.Chunk]:  # noqa: N802
        for index, chunk in enumerate(chunk_payload(PAYLOAD, CHUNK)):
            await self._pause(index)
            yield serde.encode_chunk(chunk)

    async def SubmitUpdate(  # noqa: N802
        self, request: AsyncIterator[bytes], context: Any
    ) -> pb.SubmitUpdateResponse:
        async for _ in request:
            self.taken += 1
            await self._pause(self.taken)
        return pb.SubmitUpdateResponse(verdict=pb.Verdict(accepted=True))

    async def _unused(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    Enroll = CheckIn = SubmitSecureMessage = FetchFeatures = _unused
    ReportEvaluation = Heartbeat = ReportFailure = _unused


@asynccontextmanager
async def link_to(coordinator: Slow) -> AsyncIterator[GrpcLink]:
    # no window growth (BDP probing): the coordinator takes what it reads, as a slow link would
    server = grpc.aio.server(options=[("grpc.http2.bdp_probe", 0)])
    add_bytes_servicer(server, pb.DESCRIPTOR.services_by_name["Coordinator"], coordinator)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = GrpcLink(
        f"127.0.0.1:{port}", credentials=None, enrollment_token="token", timeout_s=TIMEOUT_S
    )
    try:
        yield link
    finally:
        await link.close()
        await server.stop(None)


def enrollment() -> Enrollment:
    private, public = generate_client_key()
    return Enrollment("site-1", private, public)


def download(coordinator: Slow) -> Callable[[], Any]:
    async def body() -> Parameters:
        async with link_to(coordinator) as link:
            request = FetchModel(MODEL.sha256(), len(PAYLOAD))
            return await link.handle(enrollment(), request)

    return lambda: asyncio.run(body())


def upload(coordinator: Slow) -> Callable[[], Any]:
    async def body() -> object:
        async with link_to(coordinator) as link:
            offer = TaskOffer(1, Phase.FIT, FitConfig(round=1), "0" * 64, 600.0)
            request = SubmitUpdate(offer, MODEL, 10)
            return await link.handle(enrollment(), request)

    return lambda: asyncio.run(body())


def test_a_model_that_keeps_moving_is_downloaded_however_long_it_takes() -> None:
    # 32 chunks, 0.1 s apart: 3.2 s in all, six times the deadline
    model = download(Slow(pause_s=0.1))()
    assert model.sha256() == MODEL.sha256()


def test_a_download_that_stops_moving_fails_within_the_deadline() -> None:
    with pytest.raises(TransportError, match=r"the model's next chunk did not come within 0.5 s"):
        download(Slow(pause_s=0.0, stall_after=3))()


def test_an_upload_that_keeps_moving_is_taken_however_long_it_takes() -> None:
    coordinator = Slow(pause_s=0.1)
    assert upload(coordinator)() is None  # accepted
    assert coordinator.taken > 30  # the header and 32 chunks, each taken 0.1 s apart


def test_an_upload_the_coordinator_stops_taking_fails_within_the_deadline() -> None:
    with pytest.raises(TransportError, match=r"the upload made no progress for 0.5 s"):
        upload(Slow(pause_s=0.0, stall_after=3))()
