"""A served coordinator and the raw-protobuf peers that attack it over real gRPC.

:func:`served` builds the coordinator ``shoal coordinator serve`` builds and
serves it on 127.0.0.1 without TLS; with ``drive``, its rounds run too. A
:class:`Peer` speaks protobuf directly, as an attacker would (no Shoal client
code, which would refuse to send what it sends): it holds its own key, names
whatever client id it is told, and signs what it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc

from shoal.config import parse_config
from shoal.coordinator.server import CoordinatorParts, build
from shoal.coordinator.service import add_coordinator_service
from shoal.core import DeviceState
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.chunks import chunk_payload
from shoal.transport.messages import EnrollmentRequest
from shoal.transport.signing import NO_ROUND, generate_client_key
from support.jobs import network_job

SERVICE = "/shoal.v1.Coordinator/"


@asynccontextmanager
async def served(
    tmp_path: Path,
    *,
    run_id: str,
    tokens: list[Any],
    clients: int = 2,
    per_round: int = 2,
    drive: bool = False,
    **sections: dict[str, Any],
) -> AsyncIterator[tuple[str, CoordinatorParts]]:
    """(target, parts) of the coordinator of a digits job on 127.0.0.1; ``sections`` are
    merged over the job's; ``drive``: its rounds run meanwhile (cancelled at the end)."""
    job = network_job(
        tmp_path,
        run_id=run_id,
        token=str(tokens[0]) if tokens else "unused",
        clients=clients,
        per_round=per_round,
        **sections,
    )
    job["coordinator"]["enrollment_tokens"] = tokens
    parts = build(parse_config(job))
    server = grpc.aio.server()
    add_coordinator_service(parts.service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    rounds = asyncio.create_task(parts.driver.run()) if drive else None
    try:
        yield f"127.0.0.1:{port}", parts
    finally:
        if rounds is not None:
            rounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rounds
        await server.stop(None)
        parts.close()


class Peer:
    """A peer that names ``client_id`` and signs with its own key (a fresh one by default)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        client_id: str,
        *,
        run_id: str,
        key: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.channel = channel
        self.client_id = client_id
        self.run_id = run_id
        self.private, self.public = key or generate_client_key()

    def signed(self, message: Any, *, round_number: int = NO_ROUND) -> Any:
        serde.sign_message(
            message,
            self.private,
            client_id=self.client_id,
            run_id=self.run_id,
            round=round_number,
            timestamp=time.time(),
        )
        return message

    async def unary(self, method: str, message: Any, response_type: Any) -> Any:
        call = self.channel.unary_unary(SERVICE + method)
        return response_type.FromString(await call(message.SerializeToString(), timeout=20))

    async def enroll(self, token: str) -> pb.EnrollResponse:
        request = EnrollmentRequest(DeviceState(), self.public, token)
        message = self.signed(serde.encode_enroll_request(request))
        response: pb.EnrollResponse = await self.unary("Enroll", message, pb.EnrollResponse)
        return response

    async def check_in(self) -> pb.CheckInResponse:
        message = self.signed(serde.encode_check_in_request(DeviceState()))
        response: pb.CheckInResponse = await self.unary("CheckIn", message, pb.CheckInResponse)
        return response

    async def heartbeat(self) -> pb.HeartbeatResponse:
        message = self.signed(pb.HeartbeatRequest(device=serde.encode_device_state(DeviceState())))
        response: pb.HeartbeatResponse = await self.unary(
            "Heartbeat", message, pb.HeartbeatResponse
        )
        return response

    async def task(self, *, tries: int = 400) -> pb.Task:
        """The task of the round that picks this peer (it checks in until one comes)."""
        for _ in range(tries):
            answer = await self.check_in()
            if answer.WhichOneof("outcome") == "task":
                return answer.task
            await asyncio.sleep(0.05)
        raise AssertionError(f"no task for {self.client_id}: {answer}")

    async def fetch(self, sha256: str, *, offset: int = 0) -> bytes:
        """The model's bytes from ``offset`` (grpc's AioRpcError when it is refused)."""
        message = self.signed(pb.FetchModelRequest(version_id=sha256, offset=offset))
        download = self.channel.unary_stream(SERVICE + "FetchModel")
        data = b""
        async for chunk in download(message.SerializeToString(), timeout=20):
            data += pb.Chunk.FromString(chunk).data
        return data

    def update_header(self, task: pb.Task, payload: bytes) -> pb.UpdateHeader:
        header = pb.UpdateHeader(
            round=task.round,
            run_id=self.run_id,
            num_examples=10,
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            total_size=len(payload),
            base_model_sha256=task.model.sha256,
        )
        return self.signed(header, round_number=task.round)

    async def upload(
        self, header: pb.UpdateHeader, chunks: AsyncIterator[bytes]
    ) -> pb.SubmitUpdateResponse:
        """Send ``header``, then the UpdateParts ``chunks`` gives (as they come)."""

        async def parts() -> AsyncIterator[bytes]:
            yield pb.UpdatePart(header=header).SerializeToString()
            async for part in chunks:
                yield part

        call = self.channel.stream_unary(SERVICE + "SubmitUpdate")
        return pb.SubmitUpdateResponse.FromString(await call(parts(), timeout=20))


async def chunks_of(payload: bytes, *, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
    """The UpdateParts that carry ``payload``, after its header."""
    digest = hashlib.sha256(payload).hexdigest()
    for chunk in chunk_payload(payload, chunk_size, sha256=digest):
        yield pb.UpdatePart(chunk=serde.encode_chunk(chunk)).SerializeToString()
