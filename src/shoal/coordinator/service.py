"""The coordinator's gRPC service: authenticates every request, then hands it to the round driver.

Each RPC follows the same path: parse the bytes that arrived and decode the
message (malformed → MALFORMED; the service is registered with
:func:`add_coordinator_service`, which hands it every request as bytes, so
that grpc never parses one itself),
find the client (UNKNOWN_CLIENT, SUSPENDED), verify its Ed25519 signature
over the request (BAD_SIGNATURE), refuse a replayed nonce or a stale
timestamp (REPLAYED), and only then act. Bad input is answered with a code
and counted (``shoal_refused_requests_total``); it never raises out of the
service, so the coordinator keeps serving, and its log lines are limited per
peer (:class:`~shoal.telemetry.refusals.RefusalLog`). Under secure
aggregation, check-ins hand out the SecAgg+ stages and SubmitSecureMessage
takes the clients' replies (a frame that does not decode is MALFORMED); the
plaintext update of a secure round is refused.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import grpc

from shoal.coordinator.driver import RoundDriver
from shoal.core.device import DeviceState
from shoal.core.errors import (
    IntegrityError,
    NotFoundError,
    ProtocolError,
    RegistryError,
    SecurityError,
)
from shoal.registry import (
    ClientRecord,
    ClientRegistry,
    ClientStatus,
    EnrollmentTokens,
    Heartbeat,
    HeartbeatBuffer,
    ListedToken,
    SelectionCriteria,
    Selector,
)
from shoal.tasks import CheckInAnswer, RetryLater, RunFinished, SecureOffer
from shoal.telemetry.refusals import RefusalLog
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.chunks import ChunkAssembler, PayloadTooLarge, chunk_payload, decode_update
from shoal.transport.messages import (
    CheckInOutcome,
    Credentials,
    EnrollReply,
    HeartbeatReply,
    ModelRef,
    RejectCode,
    Rejected,
    RetryAfter,
    SecureTask,
    Task,
    Verdict,
)
from shoal.transport.rpc import add_bytes_servicer
from shoal.transport.signing import ReplayGuard, RequestAuth

log = logging.getLogger("shoal.coordinator")

HEARTBEAT_EVERY_S = 30.0
# What a check-in can change only by re-enrolling (a write); power and network are batched.
_STABLE_FIELDS = (
    "device_class",
    "app_version",
    "runtime_version",
    "model_architecture_version",
    "feature_extractor_version",
    "ram_gb",
)


class Refused(Exception):
    """A request that must be answered with ``code``; caught inside the service."""

    def __init__(self, code: RejectCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """What the service enforces beyond the protocol.

    ``enrollment_tokens`` are the config's (a bare secret has the default
    uses and lifetime of :class:`ListedToken`); they are redeemed from the
    registry like issued ones, so their uses are counted and they expire.
    """

    run_id: str
    enrollment_tokens: Collection[str | ListedToken]
    max_update_bytes: int = 64 * 2**20
    criteria: SelectionCriteria = field(
        default_factory=lambda: SelectionCriteria(require_charging=False, require_wifi=False)
    )

    def listed_tokens(self) -> list[ListedToken]:
        return [
            ListedToken(token=token) if isinstance(token, str) else token
            for token in self.enrollment_tokens
        ]


class ModelBytes:
    """The safetensors bytes of the driver's current global model, encoded once per version."""

    def __init__(self, driver: RoundDriver) -> None:
        self.driver = driver
        self._current: tuple[str, bytes] | None = None

    def current(self) -> tuple[str, bytes]:
        """(sha256, bytes) of the current model; the sha is the driver's cached one."""
        sha = self.driver.model_sha256()
        if self._current is None or self._current[0] != sha:
            self._current = (sha, self.driver.coordinator.parameters.to_bytes())
        return self._current


Context = grpc.aio.ServicerContext[Any, Any]


class CoordinatorService:
    """The eight RPCs of ``shoal.v1.Coordinator`` over a driver and a client registry.

    Each method takes its request as bytes (register it with
    :func:`add_coordinator_service`).
    """

    def __init__(
        self,
        driver: RoundDriver,
        clients: ClientRegistry,
        settings: ServiceSettings,
        *,
        selector: Selector | None = None,
        clock: Callable[[], float] = time.time,
        refusal_log: RefusalLog | None = None,
    ) -> None:
        self.driver = driver
        self.clients = clients
        self.settings = settings
        self.selector = selector or Selector(clients)
        self.clock = clock
        self.replay = ReplayGuard()
        self.heartbeats = HeartbeatBuffer(clients, max_items=1000)
        self.tokens = EnrollmentTokens(clients.database)
        self.tokens.sync_listed(settings.listed_tokens(), now=self._now())
        self.model_bytes = ModelBytes(driver)
        self.refusals: Counter[str] = Counter()
        self.refusal_log = refusal_log or RefusalLog(log)

    # --- authentication -----------------------------------------------------------------

    def _authenticate(
        self, message: Any, *, public_key: bytes | None = None, this_run: bool = False
    ) -> RequestAuth:
        """The verified auth of a request; ``this_run`` also requires it to name our run."""
        try:
            auth = serde.decode_auth(message)
        except ProtocolError as exc:
            raise Refused(RejectCode.MALFORMED, str(exc)) from exc
        if public_key is None:
            record = self._client(auth.client_id)
            public_key = record.public_key
            if public_key is None:
                raise Refused(RejectCode.UNKNOWN_CLIENT, "the client has no enrolled key")
        try:
            serde.verify_message(message, public_key)
        except (SecurityError, ProtocolError) as exc:
            raise Refused(RejectCode.BAD_SIGNATURE, str(exc)) from exc
        try:
            self.replay.check(auth, now=self.clock())
        except SecurityError as exc:
            raise Refused(RejectCode.REPLAYED, str(exc)) from exc
        if this_run and auth.run_id != self.settings.run_id:
            raise Refused(RejectCode.WRONG_ROUND, f"this coordinator runs {self.settings.run_id}")
        return auth

    def _client(self, client_id: str) -> ClientRecord:
        try:
            record = self.clients.get(client_id)
        except NotFoundError as exc:
            raise Refused(RejectCode.UNKNOWN_CLIENT, f"no enrolled client {client_id!r}") from exc
        if record.status is not ClientStatus.ACTIVE:
            raise Refused(RejectCode.SUSPENDED, f"the client is {record.status.value.lower()}")
        return record

    def _refused(self, rpc: str, refusal: Refused, context: Context) -> Verdict:
        """Count and (rate-limited) log a refusal; the verdict that answers it."""
        self.refusals[refusal.code.value] += 1
        self.refusal_log.refused(
            peer=context.peer(), rpc=rpc, reason=refusal.code.value, detail=refusal.detail
        )
        return Verdict.reject(refusal.code, refusal.detail)

    # --- RPCs ----------------------------------------------------------------------------------

    async def Enroll(self, request: bytes, context: Context) -> pb.EnrollResponse:  # noqa: N802
        try:
            message = serde.parse(pb.EnrollRequest, request)
            enrollment = serde.decode_enroll_request(message)
            auth = self._authenticate(message, public_key=enrollment.public_key)
            self._admit(auth.client_id, enrollment.enrollment_token)
            self.clients.enroll(auth.client_id, enrollment.device, public_key=enrollment.public_key)
        except (ProtocolError, RegistryError) as exc:  # NotFoundError cannot arise here
            refusal = Refused(RejectCode.MALFORMED, str(exc))
            return serde.encode_enroll_response(
                EnrollReply(self._refused("Enroll", refusal, context))
            )
        except SecurityError as exc:  # a known client id with another key
            refusal = Refused(RejectCode.BAD_SIGNATURE, str(exc))
            return serde.encode_enroll_response(
                EnrollReply(self._refused("Enroll", refusal, context))
            )
        except Refused as refusal:
            return serde.encode_enroll_response(
                EnrollReply(self._refused("Enroll", refusal, context))
            )
        return serde.encode_enroll_response(
            EnrollReply(Verdict.accept(), Credentials(auth.client_id))
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _admit(self, client_id: str, token: str) -> None:
        """Let a client enroll: already enrolled (a restart), or with a token it redeems."""
        try:
            self.clients.get(client_id)
            return  # re-enrolling is checked against its key: no token is used up
        except NotFoundError:
            pass
        try:
            self.tokens.redeem(token, client_id=client_id, now=self._now())
        except SecurityError as exc:
            raise Refused(RejectCode.BAD_TOKEN, str(exc)) from exc

    async def CheckIn(self, request: bytes, context: Context) -> pb.CheckInResponse:  # noqa: N802
        try:
            message = serde.parse(pb.CheckInRequest, request)
            auth = self._authenticate(message)
            device = serde.decode_check_in_request(message)
            record = self._refresh(auth.client_id, device)
            eligibility = self.selector.check(record, self.settings.criteria)
            if not eligibility.can_train:
                raise Refused(RejectCode.INCOMPATIBLE, eligibility.reason or "not eligible")
            outcome = self._task_or_retry(self.driver.check_in(auth.client_id))
        except ProtocolError as exc:
            verdict = self._refused("CheckIn", Refused(RejectCode.MALFORMED, str(exc)), context)
            outcome = Rejected(RejectCode.MALFORMED, verdict.detail)
        except Refused as refusal:
            verdict = self._refused("CheckIn", refusal, context)
            outcome = Rejected(refusal.code, verdict.detail)
        return serde.encode_check_in_response(outcome)

    def _refresh(self, client_id: str, device: DeviceState) -> ClientRecord:
        """Record a check-in: batched like a heartbeat, unless what the device runs changed."""
        record = self._client(client_id)
        if any(getattr(record.device, name) != getattr(device, name) for name in _STABLE_FIELDS):
            return self.clients.enroll(client_id, device)  # an app update: re-checked at once
        self._beat(client_id, device)
        return replace(record, device=device)

    def _beat(self, client_id: str, device: DeviceState) -> None:
        heartbeat = Heartbeat(
            client_id=client_id,
            seen_at=datetime.now(UTC),
            battery_level=device.battery_level,
            charging=device.charging,
            wifi=device.wifi,
        )
        self.heartbeats.add(heartbeat)

    def _task_or_retry(self, answer: CheckInAnswer) -> CheckInOutcome:
        if isinstance(answer, RunFinished):
            return answer
        if isinstance(answer, RetryLater):
            return RetryAfter(answer.seconds, answer.reason)
        if isinstance(answer, SecureOffer):
            return SecureTask(
                answer.round, self.settings.run_id, answer.request, answer.deadline_in_s
            )
        sha, data = self.model_bytes.current()
        if sha != answer.model_sha256:
            return RetryAfter(1.0, "the model is being updated")
        model = ModelRef(version_id=sha, sha256=sha, size_bytes=len(data))
        return Task(
            answer.round,
            self.settings.run_id,
            answer.phase,
            model,
            answer.config,
            answer.deadline_in_s,
            answer.secure,
        )

    async def FetchModel(  # noqa: N802
        self, request: bytes, context: Context
    ) -> AsyncIterator[pb.Chunk]:
        try:
            message = serde.parse(pb.FetchModelRequest, request)
            self._authenticate(message)
            wanted = serde.decode_fetch_model_request(message)
        except (Refused, ProtocolError) as exc:
            refusal = exc if isinstance(exc, Refused) else Refused(RejectCode.MALFORMED, str(exc))
            verdict = self._refused("FetchModel", refusal, context)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{refusal.code.value}: {verdict.detail}"
            )
            return
        sha, data = self.model_bytes.current()
        if wanted.version_id != sha:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, "wrong_model_hash: not the current model"
            )
            return
        for chunk in chunk_payload(data, start=wanted.offset):
            yield serde.encode_chunk(chunk)

    async def SubmitUpdate(  # noqa: N802
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> pb.SubmitUpdateResponse:
        try:
            verdict = await self._submit(request_iterator)
        except Refused as refusal:
            verdict = self._refused("SubmitUpdate", refusal, context)
        return serde.encode_submit_update_response(verdict)

    async def _submit(self, parts: AsyncIterator[bytes]) -> Verdict:
        try:
            header_message = serde.header_of(serde.parse(pb.UpdatePart, await anext(parts)))
            auth = self._authenticate(header_message, this_run=True)
            header = serde.decode_update_header(header_message)
        except (ProtocolError, StopAsyncIteration) as exc:
            raise Refused(RejectCode.MALFORMED, str(exc) or "empty upload") from exc
        current_sha, _ = self.model_bytes.current()
        if header.base_model_sha256 != current_sha:
            raise Refused(
                RejectCode.WRONG_MODEL_HASH, "the update is not relative to the current model"
            )
        payload = await self._payload(
            parts, pb.UpdatePart, sha256=header.payload_sha256, size=header.total_size
        )
        try:
            update = decode_update(payload)
        except (ProtocolError, IntegrityError) as exc:
            raise Refused(RejectCode.MALFORMED, str(exc)) from exc
        rejection = self.driver.submit_update(
            auth.client_id, header.round, update, header.num_examples, dict(header.metrics)
        )
        return serde.verdict_of(rejection)

    async def _payload(
        self,
        parts: AsyncIterator[bytes],
        part_type: type[serde.UploadPart],
        *,
        sha256: str,
        size: int,
    ) -> bytes:
        """The verified bytes of an upload's chunks, within the size limit."""
        if size > self.settings.max_update_bytes:
            raise Refused(RejectCode.OVERSIZED, f"{size} bytes is over the limit")
        assembler = ChunkAssembler(
            max_bytes=self.settings.max_update_bytes, expected_sha256=sha256, expected_size=size
        )
        try:
            async for part in parts:
                assembler.add(serde.chunk_of(serde.parse(part_type, part)))
            return assembler.finish()
        except PayloadTooLarge as exc:
            raise Refused(RejectCode.OVERSIZED, str(exc)) from exc
        except (ProtocolError, IntegrityError) as exc:
            raise Refused(RejectCode.MALFORMED, str(exc)) from exc

    async def SubmitSecureMessage(  # noqa: N802
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> pb.SubmitSecureMessageResponse:
        try:
            verdict = await self._submit_secure(request_iterator)
        except Refused as refusal:
            verdict = self._refused("SubmitSecureMessage", refusal, context)
        return serde.encode_submit_secure_message_response(verdict)

    async def _submit_secure(self, parts: AsyncIterator[bytes]) -> Verdict:
        try:
            first = serde.parse(pb.SecureMessagePart, await anext(parts))
            header_message = serde.secure_header_of(first)
            auth = self._authenticate(header_message, this_run=True)
            header = serde.decode_secure_message_header(header_message)
        except (ProtocolError, StopAsyncIteration) as exc:
            raise Refused(RejectCode.MALFORMED, str(exc) or "empty upload") from exc
        frame = await self._payload(
            parts, pb.SecureMessagePart, sha256=header.payload_sha256, size=header.total_size
        )
        try:
            message = serde.decode_client_message(frame)
        except ProtocolError as exc:
            raise Refused(RejectCode.MALFORMED, str(exc)) from exc
        if message.round != header.round:
            detail = f"a message of round {message.round} under a header of round {header.round}"
            raise Refused(RejectCode.MALFORMED, detail)
        rejection = self.driver.submit_secure(auth.client_id, header.round, message)
        return serde.verdict_of(rejection)

    async def ReportEvaluation(  # noqa: N802
        self, request: bytes, context: Context
    ) -> pb.ReportEvaluationResponse:
        try:
            message = serde.parse(pb.ReportEvaluationRequest, request)
            auth = self._authenticate(message, this_run=True)
            report = serde.decode_evaluation_report(message)
            rejection = self.driver.submit_evaluation(
                auth.client_id, report.round, report.loss, report.num_examples, dict(report.metrics)
            )
            verdict = serde.verdict_of(rejection)
        except ProtocolError as exc:
            refusal = Refused(RejectCode.MALFORMED, str(exc))
            verdict = self._refused("ReportEvaluation", refusal, context)
        except Refused as refusal:
            verdict = self._refused("ReportEvaluation", refusal, context)
        return serde.encode_report_evaluation_response(verdict)

    async def ReportFailure(  # noqa: N802
        self, request: bytes, context: Context
    ) -> pb.ReportFailureResponse:
        try:
            message = serde.parse(pb.ReportFailureRequest, request)
            auth = self._authenticate(message, this_run=True)
            report = serde.decode_failure_report(message)
            self.driver.report_failure(auth.client_id, report.round, report.reason)
            verdict = Verdict.accept()
        except ProtocolError as exc:
            refusal = Refused(RejectCode.MALFORMED, str(exc))
            verdict = self._refused("ReportFailure", refusal, context)
        except Refused as refusal:
            verdict = self._refused("ReportFailure", refusal, context)
        return serde.encode_report_failure_response(verdict)

    async def Heartbeat(self, request: bytes, context: Context) -> pb.HeartbeatResponse:  # noqa: N802
        try:
            message = serde.parse(pb.HeartbeatRequest, request)
            auth = self._authenticate(message)
            self._beat(auth.client_id, serde.decode_heartbeat_request(message))
            verdict = Verdict.accept()
        except (ProtocolError, RegistryError) as exc:
            verdict = self._refused("Heartbeat", Refused(RejectCode.MALFORMED, str(exc)), context)
        except Refused as refusal:
            verdict = self._refused("Heartbeat", refusal, context)
        return serde.encode_heartbeat_response(HeartbeatReply(verdict, HEARTBEAT_EVERY_S))


def add_coordinator_service(service: CoordinatorService, server: grpc.aio.Server) -> None:
    """Serve ``service`` as ``shoal.v1.Coordinator`` on ``server``, each request as bytes."""
    add_bytes_servicer(server, pb.DESCRIPTOR.services_by_name["Coordinator"], service)
