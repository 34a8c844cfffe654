"""The client's side of the gRPC protocol: a CoordinatorLink that signs every request.

The client runtime calls it as it would any link; this one opens a gRPC
channel (TLS pinned to the deployment's CA, or plaintext when explicitly
asked for), signs each request with the client's Ed25519 key, streams the
model down and the update (or a secure round's SecAgg+ reply) up in chunks,
reports a task it gives up on at once (so its round need not wait for it),
and turns every gRPC failure into a :class:`TransportError` the runtime retries.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

from shoal.client.runtime import Enrollment
from shoal.core.device import DeviceState
from shoal.core.errors import NotFoundError, SecurityError, TransportError
from shoal.core.parameters import Parameters
from shoal.secure.serde import SecureReply, encode_message
from shoal.tasks import (
    CheckInAnswer,
    Offer,
    RejectReason,
    RejectSubmission,
    RetryLater,
    RunFinished,
    SecureOffer,
    TaskOffer,
)
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport._generated import coordinator_pb2_grpc as pb_grpc
from shoal.transport.chunks import ChunkAssembler, decode_parameters
from shoal.transport.messages import (
    EnrollmentRequest,
    FailureReport,
    RetryAfter,
    SecureMessageHeader,
    SecureTask,
    Task,
    Verdict,
)
from shoal.transport.signing import NO_ROUND

T = TypeVar("T")
log = logging.getLogger(__name__)

UNKNOWN_RUN = "pending"
_REASONS = {reason.value for reason in RejectReason}


class GrpcLink:
    """A :class:`~shoal.client.runtime.CoordinatorLink` over a gRPC channel to ``target``."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        enrollment_token: str,
        rejected_retry_s: float = 30.0,
        timeout_s: float = 60.0,
        max_model_bytes: int = 2**31,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self.enrollment_token = enrollment_token
        self.rejected_retry_s = rejected_retry_s
        self.timeout_s = timeout_s
        self.max_model_bytes = max_model_bytes
        self._owns_channel = channel is None
        if channel is not None:
            self._channel = channel  # many lightweight clients in one process share one
        elif credentials is None:
            self._channel = grpc.aio.insecure_channel(target)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self.run_id = UNKNOWN_RUN

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    def _sign(self, message: Any, enrollment: Enrollment, *, round_number: int = NO_ROUND) -> None:
        serde.sign_message(
            message,
            enrollment.private_key,
            client_id=enrollment.client_id,
            run_id=self.run_id,
            round=round_number,
            timestamp=time.time(),
        )

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            detail = f"{exc.code().name}: {exc.details()}"
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                raise NotFoundError(detail) from exc  # gone for good: retrying will not help
            if exc.code() is grpc.StatusCode.PERMISSION_DENIED:
                raise SecurityError(detail) from exc
            raise TransportError(detail) from exc

    # --- the CoordinatorLink calls ----------------------------------------------------------

    async def enroll(self, enrollment: Enrollment, state: DeviceState) -> None:
        request = serde.encode_enroll_request(
            EnrollmentRequest(state, enrollment.public_key, self.enrollment_token)
        )
        self._sign(request, enrollment)
        response = await self._call(lambda: self._stub.Enroll(request, timeout=self.timeout_s))
        reply = serde.decode_enroll_response(response)
        if not reply.verdict.accepted:
            code = reply.verdict.code.value if reply.verdict.code else "refused"
            raise SecurityError(f"enrollment refused ({code}): {reply.verdict.detail}")

    async def check_in(self, enrollment: Enrollment, state: DeviceState) -> CheckInAnswer:
        request = serde.encode_check_in_request(state)
        self._sign(request, enrollment)
        response = await self._call(lambda: self._stub.CheckIn(request, timeout=self.timeout_s))
        outcome = serde.decode_check_in_response(response)
        if isinstance(outcome, Task):
            self.run_id = outcome.run_id
            return TaskOffer(
                outcome.round,
                outcome.phase,
                outcome.config,
                outcome.model.sha256,
                outcome.deadline_in_s,
                outcome.secure,
            )
        if isinstance(outcome, SecureTask):
            self.run_id = outcome.run_id
            return SecureOffer(outcome.round, outcome.request, outcome.deadline_in_s)
        if isinstance(outcome, RetryAfter):
            return RetryLater(outcome.seconds, outcome.reason)
        if isinstance(outcome, RunFinished):
            return outcome
        return RetryLater(self.rejected_retry_s, f"{outcome.code.value}: {outcome.detail}")

    async def fetch_model(self, enrollment: Enrollment, sha256: str) -> Parameters:
        request = pb.FetchModelRequest(version_id=sha256)
        self._sign(request, enrollment)
        assembler = ChunkAssembler(max_bytes=self.max_model_bytes)

        async def download() -> bytes:
            async for message in self._stub.FetchModel(request, timeout=self.timeout_s):
                assembler.add(serde.decode_chunk(message))
            return assembler.finish()

        return decode_parameters(await self._call(download), expected_sha256=sha256)

    async def submit_update(
        self,
        enrollment: Enrollment,
        offer: TaskOffer,
        update: Parameters,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> RejectSubmission | None:
        payload = update.to_bytes()
        header = pb.UpdateHeader(
            round=offer.round,
            run_id=self.run_id,
            num_examples=num_examples,
            metrics=dict(metrics),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            total_size=len(payload),
            base_model_sha256=offer.model_sha256,
        )
        self._sign(header, enrollment, round_number=offer.round)
        parts = serde.update_parts(header, payload)
        response = await self._call(lambda: self._stub.SubmitUpdate(parts, timeout=self.timeout_s))
        return _rejection(enrollment, offer.round, serde.decode_submit_update_response(response))

    async def submit_secure(
        self, enrollment: Enrollment, message: SecureReply
    ) -> RejectSubmission | None:
        frame = encode_message(message)
        header = serde.encode_secure_message_header(
            SecureMessageHeader(
                message.round, self.run_id, hashlib.sha256(frame).hexdigest(), len(frame)
            )
        )
        self._sign(header, enrollment, round_number=message.round)
        parts = serde.secure_message_parts(header, frame)
        response = await self._call(
            lambda: self._stub.SubmitSecureMessage(parts, timeout=self.timeout_s)
        )
        verdict = serde.decode_submit_secure_message_response(response)
        return _rejection(enrollment, message.round, verdict)

    async def submit_evaluation(
        self,
        enrollment: Enrollment,
        offer: TaskOffer,
        loss: float,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> RejectSubmission | None:
        request = pb.ReportEvaluationRequest(
            round=offer.round,
            run_id=self.run_id,
            loss=loss,
            num_examples=num_examples,
            metrics=dict(metrics),
            model_sha256=offer.model_sha256,
        )
        self._sign(request, enrollment, round_number=offer.round)
        response = await self._call(
            lambda: self._stub.ReportEvaluation(request, timeout=self.timeout_s)
        )
        verdict = serde.decode_report_evaluation_response(response)
        return _rejection(enrollment, offer.round, verdict)

    async def report_failure(self, enrollment: Enrollment, offer: Offer, reason: str) -> None:
        """Give up on ``offer`` at once, so that its round stops waiting for this client."""
        request = serde.encode_failure_report(
            FailureReport.summarizing(offer.round, self.run_id, reason)
        )
        self._sign(request, enrollment, round_number=offer.round)
        response = await self._call(
            lambda: self._stub.ReportFailure(request, timeout=self.timeout_s)
        )
        verdict = serde.decode_report_failure_response(response)
        if not verdict.accepted:
            log.info("the coordinator refused our failure report: %s", verdict.detail)


def _rejection(
    enrollment: Enrollment, round_number: int, verdict: Verdict
) -> RejectSubmission | None:
    if verdict.accepted or verdict.code is None:
        return None
    code = verdict.code.value
    reason = RejectReason(code) if code in _REASONS else RejectReason.INVALID_UPDATE
    detail = f"{code}: {verdict.detail}"
    return RejectSubmission(enrollment.client_id, round_number, reason, detail)
