"""Bytes protobuf cannot parse, sent to every RPC of a served coordinator over real gRPC.

An unauthenticated peer floods each method with garbage. Every request must
be answered MALFORMED (FetchModel, which streams chunks and has no verdict,
is aborted with a ``malformed:`` status), the log must stay short and free of
tracebacks, the refusals must be counted in the Prometheus counter, and a
good client must still enroll and train afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError

from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import parse_config
from shoal.coordinator.server import CoordinatorParts, serve
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.messages import RejectCode
from shoal.transport.serde import decode_reject_code
from shoal.transport.signing import generate_client_key
from support.jobs import digits_client, network_job

pytestmark = pytest.mark.timeout(180)

TOKEN = "probe-token"
RUN = "run-probe"
SERVICE = "/shoal.v1.Coordinator/"
PROBES_PER_METHOD = 128  # 8 methods: 1,024 requests
MAX_LOG_LINES = 12

# each is corrupt protobuf wire format: an invalid wire type, a length past the end, a cut varint
GARBAGE = (b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x12\x05abc", b"garbage!!")

UNARY = {
    "Enroll": pb.EnrollResponse,
    "CheckIn": pb.CheckInResponse,
    "ReportEvaluation": pb.ReportEvaluationResponse,
    "ReportFailure": pb.ReportFailureResponse,
    "Heartbeat": pb.HeartbeatResponse,
}
STREAMED_UP = {
    "SubmitUpdate": pb.SubmitUpdateResponse,
    "SubmitSecureMessage": pb.SubmitSecureMessageResponse,
}


def test_the_garbage_is_really_unparseable() -> None:
    """The probe would prove nothing if protobuf could parse what it sends."""
    for request_type in (pb.EnrollRequest, pb.UpdatePart, pb.FetchModelRequest):
        for garbage in GARBAGE:
            with pytest.raises(DecodeError):
                request_type.FromString(garbage)


def code_of(response: Any) -> RejectCode | None:
    """The reject code of any of the service's responses."""
    if isinstance(response, pb.CheckInResponse):
        return decode_reject_code(response.rejected.code)
    return decode_reject_code(response.verdict.code)


async def answer_of(method: str, response_type: Any, call: Awaitable[bytes]) -> str:
    """``method code``: the verdict's code, or the gRPC status the call failed with."""
    try:
        raw = await call
    except grpc.aio.AioRpcError as error:
        return f"{method} {error.code().name}"
    return f"{method} {code_of(response_type.FromString(raw))}"


async def probe(channel: grpc.aio.Channel) -> list[str]:
    """Garbage to every method; one line per answer: ``method code``."""
    answers = []
    for index in range(PROBES_PER_METHOD):
        garbage = GARBAGE[index % len(GARBAGE)]
        for method, response_type in UNARY.items():
            call = channel.unary_unary(SERVICE + method)
            answers.append(await answer_of(method, response_type, call(garbage, timeout=10)))
        for method, response_type in STREAMED_UP.items():

            async def parts(first: bytes = garbage) -> AsyncIterator[bytes]:
                yield first
                yield first

            upload = channel.stream_unary(SERVICE + method)
            answers.append(await answer_of(method, response_type, upload(parts(), timeout=10)))
        download = channel.unary_stream(SERVICE + "FetchModel")
        try:
            async for _ in download(garbage, timeout=10):
                answers.append("FetchModel sent a chunk")
        except grpc.aio.AioRpcError as error:
            malformed = (error.details() or "").startswith("malformed:")
            answers.append(f"FetchModel {error.code().name} malformed={malformed}")
    return answers


def test_a_flood_of_garbage_is_refused_quietly_and_good_clients_still_train(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_config(
        network_job(
            tmp_path,
            run_id=RUN,
            token=TOKEN,
            clients=2,
            per_round=2,
            run={"rounds": 1},
            round={"quorum": 1.0, "deadline_s": 30},
        )
    )
    caplog.set_level(logging.INFO)
    answers: list[str] = []
    during_probe: list[logging.LogRecord] = []
    runtimes: list[ClientRuntime] = []
    links: list[GrpcLink] = []
    tasks: list[asyncio.Task[None]] = []
    rounds: list[dict[str, Any]] = []
    served: list[CoordinatorParts] = []

    async def attack_then_train(port: int) -> None:
        target = f"127.0.0.1:{port}"
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                answers.extend(await probe(channel))
        except Exception as error:  # reported by the assertion on the answers
            answers.append(f"the probe failed: {error!r}")
        during_probe.extend(caplog.records)
        for index in range(2):  # the good clients come after the flood
            link = GrpcLink(target, credentials=None, enrollment_token=TOKEN)
            enrollment = load_or_create_enrollment(tmp_path / f"c{index}", generate_client_key)
            runtime = ClientRuntime(
                digits_client(index, 2), link, enrollment, backoff=Backoff(0.01, 0.1), seed=index
            )
            links.append(link)
            runtimes.append(runtime)
            tasks.append(asyncio.create_task(runtime.run()))

    async def main() -> None:
        started: list[asyncio.Task[None]] = []

        def on_ready(port: int, first_round: int) -> None:
            started.append(asyncio.create_task(attack_then_train(port)))

        try:
            parts = await asyncio.wait_for(
                serve(config, insecure=True, on_round=rounds.append, on_ready=on_ready), timeout=150
            )
            served.append(parts)
        finally:
            await asyncio.gather(*started)
            for runtime in runtimes:
                runtime.stop()
            await asyncio.gather(*tasks)
            for link in links:
                await link.close()

    asyncio.run(main())

    expected = [f"{method} {RejectCode.MALFORMED}" for method in [*UNARY, *STREAMED_UP]]
    expected.append("FetchModel PERMISSION_DENIED malformed=True")
    assert answers == expected * PROBES_PER_METHOD
    text = "\n".join(record.getMessage() for record in during_probe)
    assert "Traceback" not in text
    assert all(record.exc_info is None for record in during_probe)
    assert len(during_probe) <= MAX_LOG_LINES, text
    assert any("suppress" in record.getMessage() for record in during_probe), text
    registry = served[0].metrics.registry  # what the coordinator's /metrics serves
    labels = {"rpc": "Enroll", "reason": "malformed"}
    assert registry.get_sample_value("shoal_refused_requests_total", labels) == PROBES_PER_METHOD
    for method, verdict in [("Enroll", "malformed"), ("FetchModel", "permission_denied")]:
        labels = {"method": method, "verdict": verdict}  # each RPC timed, with its verdict
        count = registry.get_sample_value("shoal_rpc_duration_seconds_count", labels)
        assert count == PROBES_PER_METHOD, (method, verdict)
    assert [row["round"] for row in rounds] == [1]  # the good clients enrolled and trained
    assert rounds[0]["reported"] == 2
