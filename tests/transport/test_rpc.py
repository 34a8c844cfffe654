"""Servicers that take bytes: each method registered by its streaming kind; garbage reaches them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.rpc import add_bytes_servicer, bytes_method_handlers

COORDINATOR = pb.DESCRIPTOR.services_by_name["Coordinator"]


class Echo:
    """Answers each call with what it received, to show the servicer gets bytes."""

    def __init__(self) -> None:
        self.received: list[object] = []

    async def Heartbeat(self, request: bytes, context: Any) -> pb.HeartbeatResponse:  # noqa: N802
        self.received.append(request)
        return pb.HeartbeatResponse(next_heartbeat_in_s=float(len(request)))

    async def SubmitUpdate(  # noqa: N802
        self, parts: AsyncIterator[bytes], context: Any
    ) -> pb.SubmitUpdateResponse:
        async for part in parts:
            self.received.append(part)
        return pb.SubmitUpdateResponse()

    def __getattr__(self, name: str) -> Any:
        if name in COORDINATOR.methods_by_name:
            return self.Heartbeat
        raise AttributeError(name)


def test_a_servicer_lacking_a_method_is_refused_at_registration() -> None:
    class Partial:
        async def Heartbeat(self, request: bytes, context: Any) -> None:  # noqa: N802
            return None

    with pytest.raises(TypeError, match=r"Partial lacks the methods \['Enroll'"):
        bytes_method_handlers(COORDINATOR, Partial())


def test_every_method_is_registered_with_its_streaming_kind() -> None:
    handlers = bytes_method_handlers(COORDINATOR, Echo())
    assert set(handlers) == set(COORDINATOR.methods_by_name)
    for name, handler in handlers.items():
        method = COORDINATOR.methods_by_name[name]
        assert (handler.request_streaming, handler.response_streaming) == (
            method.client_streaming,
            method.server_streaming,
        )
        assert handler.request_deserializer is None


def test_garbage_reaches_the_servicer_as_bytes_over_a_real_socket() -> None:
    echo = Echo()
    garbage = b"\xff" * 16

    async def main() -> tuple[float, bytes]:
        server = grpc.aio.server()
        add_bytes_servicer(server, COORDINATOR, echo)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/shoal.v1.Coordinator/Heartbeat")
                reply = serde.parse(pb.HeartbeatResponse, await call(garbage, timeout=10))

                async def parts() -> AsyncIterator[bytes]:
                    yield garbage
                    yield b""

                upload = channel.stream_unary("/shoal.v1.Coordinator/SubmitUpdate")
                answer = await upload(parts(), timeout=10)
        finally:
            await server.stop(None)
        return reply.next_heartbeat_in_s, answer

    every_s, answer = asyncio.run(main())
    assert every_s == len(garbage)
    assert answer == b""  # an empty SubmitUpdateResponse, serialized
    assert echo.received == [garbage, garbage, b""]
