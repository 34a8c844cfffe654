"""The client's side of the gRPC protocol: a CoordinatorLink that signs every request.

The client runtime calls its one method, ``handle``, as it would any link's; this one opens a gRPC
channel (TLS pinned to the deployment's CA, or plaintext when explicitly
asked for), signs each request with the client's Ed25519 key, streams the
model down and the update (or a secure round's SecAgg+ reply) up in chunks,
reports a task it gives up on at once (so its round need not wait for it),
and turns every gRPC failure into a :class:`TransportError` the runtime retries.

A request's deadline is ``timeout_s`` (60 s). A stream's is per part: each
chunk of the model must arrive, and each chunk of an upload must be taken
by the coordinator, within ``timeout_s`` of the one before (and its answer
within ``timeout_s`` of the last), so a large model crosses a slow link as
long as it keeps moving, where one deadline for the whole stream made a
model of more than a minute's transfer impossible to download or upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar, cast

import grpc

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
    Submitted,
    SubmitUpdate,
)
from shoal.core.errors import BusyError, NotFoundError, SecurityError, TransportError
from shoal.core.parameters import Parameters
from shoal.features import FeatureLimits
from shoal.governance.attestation import Attester, Binding, Evidence
from shoal.secure.serde import encode_message
from shoal.tasks import (
    CheckInAnswer,
    RejectReason,
    RejectSubmission,
    RetryLater,
    RunFinished,
    SecureOffer,
    TaskOffer,
)
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2_grpc as pb_grpc
from shoal.transport.chunks import ChunkAssembler, decode_parameters
from shoal.transport.messages import (
    EnrollmentRequest,
    EvaluationReport,
    FailureReport,
    FeaturesRequest,
    ModelRequest,
    RetryAfter,
    SecureMessageHeader,
    SecureTask,
    Task,
    UpdateHeader,
    Verdict,
    one_line,
)
from shoal.transport.signing import NO_ROUND, new_nonce

T = TypeVar("T")
log = logging.getLogger(__name__)

UNKNOWN_RUN = "pending"
CHANNEL_OPTIONS = [("grpc.max_reconnect_backoff_ms", 5_000)]
"""gRPC's own reconnection backoff grows to 120 s by default: after a 60 s outage a client
retrying every 0.2 s got through 12 s after the coordinator was back, 2 s with this cap
(the runtime's :class:`~shoal.client.runtime.Backoff` has the same one)."""
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
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self.run_id = UNKNOWN_RUN

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    def _sign(
        self,
        message: Any,
        enrollment: Enrollment,
        *,
        round_number: int = NO_ROUND,
        attester: Attester | None = None,
    ) -> None:
        """Sign ``message``; with an ``attester``, first attach evidence made for this request."""
        nonce = new_nonce()
        if attester is not None:
            binding = Binding(enrollment.client_id, enrollment.public_key, self.run_id, nonce)
            data = attester.evidence(binding.challenge())
            serde.set_evidence(message, Evidence(attester.kind, data))
        serde.sign_message(
            message,
            enrollment.private_key,
            client_id=enrollment.client_id,
            run_id=self.run_id,
            round=round_number,
            timestamp=time.time(),
            nonce=nonce,
        )

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:  # the details are the server's text: one line
            detail = f"{exc.code().name}: {one_line(exc.details() or '')}"
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                raise NotFoundError(detail) from exc  # gone for good: retrying will not help
            if exc.code() is grpc.StatusCode.PERMISSION_DENIED:
                raise SecurityError(detail) from exc
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise BusyError(detail) from exc
            raise TransportError(detail) from exc

    async def _within(self, step: Awaitable[T], what: str) -> T:
        """``step``, if it is done within ``timeout_s``; else a :class:`TransportError`."""
        try:
            return await asyncio.wait_for(step, self.timeout_s)
        except TimeoutError:
            raise TransportError(f"{what} did not come within {self.timeout_s:g} s") from None

    async def _paced(self, method: Callable[[Iterator[Any]], Any], parts: Iterable[Any]) -> Any:
        """The answer to the upload of ``parts`` by the client-streaming ``method``: each part
        taken by the coordinator, and then the answer given, within ``timeout_s`` of the one
        before, however long the whole takes (a :class:`TransportError` otherwise)."""
        moved = time.monotonic()

        def fed() -> Iterator[Any]:  # gRPC takes the next part once the last one is written
            nonlocal moved
            for part in parts:
                moved = time.monotonic()
                yield part
            moved = time.monotonic()

        call = method(fed())
        answer = asyncio.ensure_future(call)
        try:
            while not answer.done():
                left = moved + self.timeout_s - time.monotonic()
                if left <= 0:
                    raise TransportError(f"the upload made no progress for {self.timeout_s:g} s")
                await asyncio.wait({answer}, timeout=left)
            return answer.result()
        finally:
            if not answer.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await answer

    # --- the one method of a link -----------------------------------------------------------

    async def handle(self, enrollment: Enrollment, request: Request[T]) -> T:
        """Carry ``request`` to the coordinator over gRPC; returns its answer."""
        answer: object
        match request:
            case Enroll():
                await self._enroll(enrollment, request)
                answer = None
            case CheckIn():
                answer = await self._check_in(enrollment, request)
            case FetchModel():
                answer = await self._fetch_model(enrollment, request)
            case FetchFeatures():
                answer = await self._fetch_features(enrollment, request)
            case SubmitUpdate():
                answer = await self._submit_update(enrollment, request)
            case SubmitEvaluation():
                answer = await self._submit_evaluation(enrollment, request)
            case SubmitSecure():
                answer = await self._submit_secure(enrollment, request)
            case ReportFailure():
                await self._report_failure(enrollment, request)
                answer = None
            case _:
                raise TypeError(f"not a request this link carries: {request!r}")
        return cast(T, answer)

    async def _enroll(self, enrollment: Enrollment, request: Enroll) -> None:
        message = serde.encode_enroll_request(
            EnrollmentRequest(request.state, enrollment.public_key, self.enrollment_token)
        )
        self._sign(message, enrollment, attester=request.attester)
        response = await self._call(lambda: self._stub.Enroll(message, timeout=self.timeout_s))
        reply = serde.decode_enroll_response(response)
        if not reply.verdict.accepted:
            code = reply.verdict.code.value if reply.verdict.code else "refused"
            raise SecurityError(f"enrollment refused ({code}): {reply.verdict.detail}")

    async def _check_in(self, enrollment: Enrollment, request: CheckIn) -> CheckInAnswer:
        message = serde.encode_check_in_request(request.state)
        self._sign(message, enrollment, attester=request.attester)
        response = await self._call(lambda: self._stub.CheckIn(message, timeout=self.timeout_s))
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
                outcome.model.version,
                outcome.model.size_bytes,
            )
        if isinstance(outcome, SecureTask):
            self.run_id = outcome.run_id
            return SecureOffer(outcome.round, outcome.request, outcome.deadline_in_s)
        if isinstance(outcome, RetryAfter):
            return RetryLater(outcome.seconds, outcome.reason)
        if isinstance(outcome, RunFinished):
            return outcome
        reason = f"{outcome.code.value}: {outcome.detail}"
        log.warning("check-in refused (%s); trying again in %gs", reason, self.rejected_retry_s)
        return RetryLater(self.rejected_retry_s, reason)

    async def _fetch_model(self, enrollment: Enrollment, request: FetchModel) -> Parameters:
        message = serde.encode_fetch_model_request(ModelRequest(request.sha256))
        self._sign(message, enrollment)
        # the size its task announced: a stream declaring another is refused at its first chunk
        assembler = ChunkAssembler(max_bytes=self.max_model_bytes, expected_size=request.size_bytes)
        data = await self._download(self._stub.FetchModel, message, assembler, "the model")
        return decode_parameters(data, expected_sha256=request.sha256)

    async def _download(
        self, method: Callable[[Any], Any], message: Any, assembler: ChunkAssembler, what: str
    ) -> bytes:
        """The payload the server-streaming ``method`` sends for ``message``, assembled and
        checked; no deadline for the whole, ``timeout_s`` for each chunk."""

        async def download() -> bytes:
            call = method(message)
            try:
                while True:
                    chunk = await self._within(call.read(), f"{what}'s next chunk")
                    if chunk is grpc.aio.EOF:
                        break
                    assembler.add(serde.decode_chunk(cast(Any, chunk)))
            finally:
                call.cancel()  # nothing, once the stream ended
            return assembler.finish()

        return await self._call(download)

    async def _fetch_features(self, enrollment: Enrollment, request: FetchFeatures) -> bytes | None:
        """The run's feature module's bytes, checked against the sha256 asked for; None when
        the run has none (asked without a sha256: the coordinator's NOT_FOUND says so)."""
        message = serde.encode_fetch_features_request(FeaturesRequest(request.sha256))
        self._sign(message, enrollment)
        # the data hashes to the declared sha256, which must be the one asked for
        assembler = ChunkAssembler(
            max_bytes=FeatureLimits().max_module_bytes, expected_sha256=request.sha256
        )
        try:
            return await self._download(
                self._stub.FetchFeatures, message, assembler, "the feature module"
            )
        except NotFoundError:
            if request.sha256 is None:
                return None
            raise

    async def _submit_update(self, enrollment: Enrollment, request: SubmitUpdate) -> Submitted:
        offer = request.offer
        payload = (  # hashed once, below
            request.update.to_bytes(content_sha256=False)
            if request.payload is None
            else request.payload
        )
        header = serde.encode_update_header(
            UpdateHeader(
                round=offer.round,
                run_id=self.run_id,
                num_examples=request.num_examples,
                payload_sha256=hashlib.sha256(payload).hexdigest(),
                total_size=len(payload),
                base_model_sha256=offer.model_sha256,
                metrics=request.metrics,
                codec=request.codec if request.payload is not None else "",
                features_sha256=request.features_sha256,
            )
        )
        self._sign(header, enrollment, round_number=offer.round)
        parts = serde.update_parts(header, payload)
        response = await self._call(lambda: self._paced(self._stub.SubmitUpdate, parts))
        return _rejection(enrollment, offer.round, serde.decode_submit_update_response(response))

    async def _submit_secure(self, enrollment: Enrollment, request: SubmitSecure) -> Submitted:
        reply = request.message
        frame = encode_message(reply)
        header = serde.encode_secure_message_header(
            SecureMessageHeader(
                reply.round,
                self.run_id,
                hashlib.sha256(frame).hexdigest(),
                len(frame),
                request.features_sha256,
            )
        )
        self._sign(header, enrollment, round_number=reply.round)
        parts = serde.secure_message_parts(header, frame)
        response = await self._call(lambda: self._paced(self._stub.SubmitSecureMessage, parts))
        verdict = serde.decode_submit_secure_message_response(response)
        return _rejection(enrollment, reply.round, verdict)

    async def _submit_evaluation(
        self, enrollment: Enrollment, request: SubmitEvaluation
    ) -> Submitted:
        offer = request.offer
        message = serde.encode_evaluation_report(
            EvaluationReport(
                round=offer.round,
                run_id=self.run_id,
                loss=request.loss,
                num_examples=request.num_examples,
                model_sha256=offer.model_sha256,
                metrics=request.metrics,
                features_sha256=request.features_sha256,
            )
        )
        self._sign(message, enrollment, round_number=offer.round)
        response = await self._call(
            lambda: self._stub.ReportEvaluation(message, timeout=self.timeout_s)
        )
        verdict = serde.decode_report_evaluation_response(response)
        return _rejection(enrollment, offer.round, verdict)

    async def _report_failure(self, enrollment: Enrollment, request: ReportFailure) -> None:
        """Give up on the offer at once, so that its round stops waiting for this client."""
        round_number = request.offer.round
        message = serde.encode_failure_report(
            FailureReport.summarizing(round_number, self.run_id, request.reason)
        )
        self._sign(message, enrollment, round_number=round_number)
        response = await self._call(
            lambda: self._stub.ReportFailure(message, timeout=self.timeout_s)
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
