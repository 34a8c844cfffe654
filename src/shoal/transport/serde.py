"""Protobuf messages to Shoal's typed messages and back: the one module that knows both.

Every ``encode_*`` function builds a message of ``coordinator.proto`` from a
typed message (``shoal.transport.messages``, ``FitConfig``...); every
``decode_*`` function does the reverse and raises ``ProtocolError`` for a
message no well-behaved peer sends (a missing field, an unknown enum value,
a value out of range). Requests are signed over their body's digest
(:func:`request_digest`): :func:`sign_message` on the client,
:func:`verify_message` on the coordinator. Byte payloads (models, updates,
masked inputs) travel as chunks: see ``shoal.transport.chunks``. SecAgg+
messages travel as the frames of ``shoal.secure.serde``, checked here to be a
request (coordinator to client) or a reply (client to coordinator).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, Literal, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from shoal.client.api import EvaluateConfig, FitConfig
from shoal.core.device import DeviceState
from shoal.core.digests import check_sha256_hex
from shoal.core.errors import ClientError, ProtocolError
from shoal.governance.attestation import Evidence
from shoal.registry import VersionSignature
from shoal.secure.homomorphic import EncryptedUpdate, EncryptionRequest
from shoal.secure.messages import ClientMessage, MaskedInputRequest, ServerRequest
from shoal.secure.serde import SecureReply, SecureRequest, decode_message, encode_message
from shoal.tasks import ModelVersion, Phase, RejectSubmission, RunFinished
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.chunks import DEFAULT_CHUNK_SIZE, chunk_payload
from shoal.transport.messages import (
    CheckInOutcome,
    Chunk,
    Credentials,
    EnrollmentRequest,
    EnrollReply,
    EvaluationReport,
    FailureReport,
    FeaturesRequest,
    HeartbeatReply,
    ModelRef,
    ModelRequest,
    RejectCode,
    Rejected,
    RetryAfter,
    SecureMessageHeader,
    SecureTask,
    Task,
    UpdateHeader,
    Verdict,
    one_line,
)
from shoal.transport.signing import RequestAuth, create_request_auth, verify_request

AuthenticatedRequest = (
    pb.EnrollRequest
    | pb.CheckInRequest
    | pb.FetchModelRequest
    | pb.FetchFeaturesRequest
    | pb.UpdateHeader
    | pb.SecureMessageHeader
    | pb.ReportEvaluationRequest
    | pb.HeartbeatRequest
    | pb.ReportFailureRequest
)
"""The messages that carry a signed ``RequestAuth``."""

_T = TypeVar("_T")
_M = TypeVar("_M", bound=Message)
UploadPart = pb.UpdatePart | pb.SecureMessagePart
"""The client-streamed messages of an upload: a header, then chunks."""

_INT64 = 2**63
_REJECT_PREFIX = "REJECT_CODE_"
_PHASES = {Phase.FIT: pb.PHASE_FIT, Phase.EVALUATE: pb.PHASE_EVALUATE}
_PHASE_OF = {value: phase for phase, value in _PHASES.items()}


def _checked(build: Callable[[], _T], what: str) -> _T:
    """Run ``build``, mapping protobuf's and the typed messages' value errors to ProtocolError."""
    try:
        return build()
    except (ValueError, TypeError, OverflowError, ClientError) as exc:
        raise ProtocolError(f"malformed {what}: {exc}") from exc


def parse(message_type: type[_M], data: bytes) -> _M:
    """A message of ``message_type`` from the bytes that arrived; ``ProtocolError`` if corrupt.

    The servicer parses each request itself (see ``shoal.transport.rpc``), so
    that bytes protobuf cannot parse are refused like any other bad input.
    """
    name = message_type.DESCRIPTOR.name
    if not isinstance(data, bytes):
        raise ProtocolError(f"a {name} must arrive as bytes, got {type(data).__name__}")
    try:
        return message_type.FromString(data)
    except (DecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{len(data)} bytes that do not parse as a protobuf {name}") from exc


def _require(message: Any, field: str, what: str) -> None:
    if not message.HasField(field):
        raise ProtocolError(f"{what} lacks its {field!r} field")


# --- request authentication ---------------------------------------------------------


def request_digest(message: AuthenticatedRequest) -> str:
    """The sha256 a request's signature covers: its type's name and its body without ``auth``.

    Deterministic serialization makes both ends hash the same bytes for the
    same field values (maps in key order, fields in number order).
    """
    body = type(message)()
    body.CopyFrom(message)  # type: ignore[arg-type]  # the same type, as mypy cannot see
    body.ClearField("auth")
    digest = hashlib.sha256(message.DESCRIPTOR.full_name.encode())
    digest.update(b"\0")
    digest.update(body.SerializeToString(deterministic=True))
    return digest.hexdigest()


def encode_auth(auth: RequestAuth) -> pb.RequestAuth:
    return pb.RequestAuth(
        client_id=auth.client_id,
        run_id=auth.run_id,
        round=auth.round,
        nonce=auth.nonce,
        timestamp=auth.timestamp,
        payload_sha256=auth.payload_sha256,
        signature=auth.signature,
    )


def decode_auth(message: AuthenticatedRequest) -> RequestAuth:
    """The typed ``RequestAuth`` of a request; ``ProtocolError`` if absent or malformed."""
    _require(message, "auth", type(message).__name__)
    auth = message.auth
    return RequestAuth(
        auth.client_id,
        auth.run_id,
        auth.round,
        auth.nonce,
        auth.timestamp,
        auth.payload_sha256,
        auth.signature,
    )


def sign_message(
    message: AuthenticatedRequest,
    private_key: bytes,
    *,
    client_id: str,
    run_id: str,
    round: int,
    timestamp: float,
    nonce: bytes | None = None,
) -> RequestAuth:
    """Sign a request in place (fills its ``auth`` field) and return the auth.

    Set every other field first: the signature covers the body as it is now.
    The nonce is fresh unless given (attestation evidence is made for it first).
    """
    auth = create_request_auth(
        private_key,
        client_id=client_id,
        run_id=run_id,
        round=round,
        payload_sha256=request_digest(message),
        timestamp=timestamp,
        nonce=nonce,
    )
    message.auth.CopyFrom(encode_auth(auth))
    return auth


def verify_message(message: AuthenticatedRequest, public_key: bytes) -> RequestAuth:
    """Check a request's signature against its body; ``SecurityError`` if it does not verify.

    Freshness (nonce and timestamp) is the ``ReplayGuard``'s job, after this.
    """
    auth = decode_auth(message)
    verify_request(public_key, auth, payload_sha256=request_digest(message))
    return auth


# --- enums ---------------------------------------------------------------------------


def encode_reject_code(code: RejectCode) -> pb.RejectCode.ValueType:
    return pb.RejectCode.Value(_REJECT_PREFIX + code.name)


def decode_reject_code(value: int) -> RejectCode:
    """The typed code of a wire value; ``ProtocolError`` for unspecified or unknown values."""
    try:
        name = pb.RejectCode.Name(pb.RejectCode.ValueType(value)).removeprefix(_REJECT_PREFIX)
        return RejectCode[name]
    except (ValueError, KeyError) as exc:
        raise ProtocolError(f"unknown reject code {value}") from exc


def _decode_phase(value: int) -> Phase:
    if value == pb.PHASE_SECURE_AGGREGATION:
        raise ProtocolError("a secure-aggregation stage is not a fit or evaluate task")
    try:
        return _PHASE_OF[pb.Phase.ValueType(value)]
    except KeyError as exc:
        raise ProtocolError(f"unknown phase {value}") from exc


# --- device, enrollment --------------------------------------------------------------


_DeviceFact = Literal["battery_level", "charging", "wifi", "ram_gb", "idle"]
_DEVICE_FACTS: tuple[_DeviceFact, ...] = ("battery_level", "charging", "wifi", "ram_gb", "idle")
"""The optional fields of a DeviceState: unset on the wire is None (unknown) in Python."""


def encode_device_state(state: DeviceState) -> pb.DeviceState:
    facts = {name: getattr(state, name) for name in _DEVICE_FACTS}
    return _checked(
        lambda: pb.DeviceState(
            device_class=state.device_class,
            app_version=state.app_version,
            runtime_version=state.runtime_version,
            model_architecture_version=state.model_architecture_version,
            feature_extractor_version=state.feature_extractor_version or "",
            **{name: value for name, value in facts.items() if value is not None},
        ),
        "device state",
    )


def decode_device_state(message: pb.DeviceState) -> DeviceState:
    facts = {name: getattr(message, name) for name in _DEVICE_FACTS if message.HasField(name)}
    return DeviceState(
        device_class=message.device_class,
        app_version=message.app_version,
        runtime_version=message.runtime_version,
        model_architecture_version=message.model_architecture_version,
        feature_extractor_version=message.feature_extractor_version or None,
        **facts,
    )


def encode_enroll_request(request: EnrollmentRequest) -> pb.EnrollRequest:
    message = pb.EnrollRequest(
        device=encode_device_state(request.device),
        public_key=request.public_key,
        enrollment_token=request.enrollment_token,
    )
    set_evidence(message, request.evidence)
    return message


def decode_enroll_request(message: pb.EnrollRequest) -> EnrollmentRequest:
    _require(message, "device", "EnrollRequest")
    return EnrollmentRequest(
        decode_device_state(message.device),
        message.public_key,
        message.enrollment_token,
        decode_evidence(message),
    )


def set_evidence(message: pb.EnrollRequest | pb.CheckInRequest, evidence: Evidence | None) -> None:
    """Attach a client's attestation to an enrollment or a check-in (None: clear it)."""
    if evidence is None:
        message.ClearField("attestation")
        return
    message.attestation.CopyFrom(pb.Attestation(kind=evidence.kind, evidence=evidence.data))


def decode_evidence(message: pb.EnrollRequest | pb.CheckInRequest) -> Evidence | None:
    """The attestation an enrollment or a check-in carries; None when it carries none."""
    if not message.HasField("attestation"):
        return None
    attestation = message.attestation
    return _checked(lambda: Evidence(attestation.kind, attestation.evidence), "attestation")


def encode_enroll_response(reply: EnrollReply) -> pb.EnrollResponse:
    message = pb.EnrollResponse(verdict=encode_verdict(reply.verdict))
    if reply.credentials is not None:
        message.credentials.client_id = reply.credentials.client_id
        message.credentials.expires_at = reply.credentials.expires_at or 0.0
    return message


def decode_enroll_response(message: pb.EnrollResponse) -> EnrollReply:
    _require(message, "verdict", "EnrollResponse")
    credentials = None
    if message.HasField("credentials"):
        expires_at = message.credentials.expires_at or None
        credentials = Credentials(message.credentials.client_id, expires_at)
    return EnrollReply(decode_verdict(message.verdict), credentials)


def encode_check_in_request(state: DeviceState) -> pb.CheckInRequest:
    return pb.CheckInRequest(device=encode_device_state(state))


def decode_check_in_request(message: pb.CheckInRequest) -> DeviceState:
    _require(message, "device", "CheckInRequest")
    return decode_device_state(message.device)


def encode_heartbeat_request(state: DeviceState) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(device=encode_device_state(state))


def decode_heartbeat_request(message: pb.HeartbeatRequest) -> DeviceState:
    _require(message, "device", "HeartbeatRequest")
    return decode_device_state(message.device)


# --- verdicts ------------------------------------------------------------------------


def encode_verdict(verdict: Verdict) -> pb.Verdict:
    code = pb.REJECT_CODE_UNSPECIFIED if verdict.code is None else encode_reject_code(verdict.code)
    return pb.Verdict(accepted=verdict.accepted, code=code, detail=verdict.detail)


def decode_verdict(message: pb.Verdict) -> Verdict:
    """A coordinator's verdict; its detail is one printable line (a client logs and shows it)."""
    detail = one_line(message.detail)
    if message.accepted:
        if message.code != pb.REJECT_CODE_UNSPECIFIED:
            raise ProtocolError("an accepted verdict carries a reject code")
        return Verdict.accept(detail)
    return Verdict.reject(decode_reject_code(message.code), detail)


def verdict_of(rejection: RejectSubmission | None) -> Verdict:
    """The verdict for what the coordinator said of a submission (None: it counted)."""
    if rejection is None:
        return Verdict.accept()
    return Verdict.reject(RejectCode.from_reason(rejection.reason), rejection.detail)


def verdict_label(response: Message) -> str:
    """What a response told its caller, as a metric label: ``accepted``, a reject code
    (``malformed``...), or a check-in's outcome (``task``, ``retry_after``, ``run_finished``);
    ``ok`` for a response that carries no verdict (a model chunk)."""
    if isinstance(response, pb.CheckInResponse):
        kind = response.WhichOneof("outcome")
        if kind == "rejected":
            return _reject_label(response.rejected.code)
        return kind or "empty"
    verdict = getattr(response, "verdict", None)
    if not isinstance(verdict, pb.Verdict):
        return "ok"
    return "accepted" if verdict.accepted else _reject_label(verdict.code)


def _reject_label(code: int) -> str:
    try:
        return decode_reject_code(code).value
    except ProtocolError:
        return "unknown"


def encode_submit_secure_message_response(verdict: Verdict) -> pb.SubmitSecureMessageResponse:
    return pb.SubmitSecureMessageResponse(verdict=encode_verdict(verdict))


def decode_submit_secure_message_response(message: pb.SubmitSecureMessageResponse) -> Verdict:
    _require(message, "verdict", "SubmitSecureMessageResponse")
    return decode_verdict(message.verdict)


def encode_submit_update_response(verdict: Verdict) -> pb.SubmitUpdateResponse:
    return pb.SubmitUpdateResponse(verdict=encode_verdict(verdict))


def decode_submit_update_response(message: pb.SubmitUpdateResponse) -> Verdict:
    _require(message, "verdict", "SubmitUpdateResponse")
    return decode_verdict(message.verdict)


def encode_report_evaluation_response(verdict: Verdict) -> pb.ReportEvaluationResponse:
    return pb.ReportEvaluationResponse(verdict=encode_verdict(verdict))


def decode_report_evaluation_response(message: pb.ReportEvaluationResponse) -> Verdict:
    _require(message, "verdict", "ReportEvaluationResponse")
    return decode_verdict(message.verdict)


def encode_heartbeat_response(reply: HeartbeatReply) -> pb.HeartbeatResponse:
    return pb.HeartbeatResponse(
        verdict=encode_verdict(reply.verdict), next_heartbeat_in_s=reply.next_heartbeat_in_s
    )


def decode_heartbeat_response(message: pb.HeartbeatResponse) -> HeartbeatReply:
    _require(message, "verdict", "HeartbeatResponse")
    return HeartbeatReply(decode_verdict(message.verdict), message.next_heartbeat_in_s)


# --- tasks ---------------------------------------------------------------------------


def _encode_scalar(key: str, value: object) -> pb.Scalar:
    if isinstance(value, bool | np.bool_):
        return pb.Scalar(bool_value=bool(value))
    if isinstance(value, int | np.integer):
        if not -_INT64 <= int(value) < _INT64:
            raise ProtocolError(f"extras[{key!r}] = {value} does not fit in 64 bits")
        return pb.Scalar(int_value=int(value))
    if isinstance(value, float | np.floating):
        return pb.Scalar(float_value=float(value))
    if isinstance(value, str):
        return pb.Scalar(string_value=value)
    raise ProtocolError(
        f"extras[{key!r}] is a {type(value).__name__}: only bool, int, float and str travel"
    )


def _encode_extras(extras: Mapping[str, Any], target: MutableMapping[str, pb.Scalar]) -> None:
    for key, value in extras.items():
        if not isinstance(key, str):
            raise ProtocolError(f"extras keys must be strings, got {key!r}")
        target[key].CopyFrom(_encode_scalar(key, value))


def _decode_extras(source: Mapping[str, pb.Scalar]) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    for key, scalar in source.items():
        kind = scalar.WhichOneof("kind")
        if kind is None:
            raise ProtocolError(f"extras[{key!r}] has no value")
        extras[key] = getattr(scalar, kind)
    return extras


def encode_model_ref(model: ModelRef) -> pb.ModelRef:
    """A model reference; its version's signature travels without its run (the task's)."""
    message = pb.ModelRef(
        version_id=model.version_id, sha256=model.sha256, size_bytes=model.size_bytes
    )
    version = model.version
    if version is not None:
        message.name, message.version, message.round = version.name, version.version, version.round
        message.features_sha256 = version.features_sha256 or ""
        message.preprocessing_sha256 = version.preprocessing_sha256 or ""
        if version.signed is not None:
            message.key_id = version.signed.key_id
            message.signature = version.signed.signature
    return message


def decode_model_ref(message: pb.ModelRef, *, run_id: str) -> ModelRef:
    """A model reference of a task of ``run_id``: the run its signature must have been made for."""
    version = None
    if message.name:
        signed = None
        if message.signature or message.key_id:
            signed = VersionSignature(run_id, message.key_id, message.signature)
        features = message.features_sha256 or None
        if features is not None:
            check_sha256_hex(features, "feature module sha256")
        scaler = message.preprocessing_sha256 or None
        if scaler is not None:
            check_sha256_hex(scaler, "scaler sha256")
        version = ModelVersion(
            message.name, message.version, message.round, signed, features, scaler
        )
    return ModelRef(message.version_id, message.sha256, message.size_bytes, version)


def encode_task(task: Task) -> pb.Task:
    message = pb.Task(
        round=task.round,
        run_id=task.run_id,
        phase=_PHASES[task.phase],
        model=encode_model_ref(task.model),
        deadline_in_s=task.deadline_in_s,
    )
    if task.secure is not None:
        message.secure_request = encode_message(task.secure)
    config = task.config
    if isinstance(config, FitConfig):
        _checked(
            lambda: message.fit.MergeFrom(
                pb.FitConfig(
                    epochs=config.epochs,
                    batch_size=config.batch_size,
                    learning_rate=config.learning_rate,
                    proximal_mu=config.proximal_mu,
                    seed=config.seed,
                )
            ),
            "fit config",
        )
        _encode_extras(config.extras, message.fit.extras)
    else:
        _checked(lambda: setattr(message.evaluate, "batch_size", config.batch_size), "config")
        _encode_extras(config.extras, message.evaluate.extras)
    return message


def decode_task(message: pb.Task) -> Task:
    phase = _decode_phase(message.phase)
    _require(message, "model", "Task")
    model = decode_model_ref(message.model, run_id=message.run_id)
    config: FitConfig | EvaluateConfig
    kind = message.WhichOneof("config")
    if kind == "fit":
        fit = message.fit
        config = _checked(
            lambda: FitConfig(
                round=message.round,
                epochs=fit.epochs,
                batch_size=fit.batch_size,
                learning_rate=fit.learning_rate,
                proximal_mu=fit.proximal_mu,
                seed=fit.seed,
                extras=_decode_extras(fit.extras),
            ),
            "fit config",
        )
    elif kind == "evaluate":
        evaluate = message.evaluate
        config = EvaluateConfig(message.round, evaluate.batch_size, _decode_extras(evaluate.extras))
    else:
        raise ProtocolError("a task has neither a fit nor an evaluate config")
    secure = decode_secure_request(message.secure_request) if message.secure_request else None
    if secure is not None and not isinstance(secure, MaskedInputRequest | EncryptionRequest):
        raise ProtocolError(f"a {phase.value} task carries a {secure.stage.label} request")
    return Task(message.round, message.run_id, phase, model, config, message.deadline_in_s, secure)


def encode_secure_task(task: SecureTask) -> pb.Task:
    """A key or unmask stage as a ``PHASE_SECURE_AGGREGATION`` task: the request, no model."""
    return pb.Task(
        round=task.round,
        run_id=task.run_id,
        phase=pb.PHASE_SECURE_AGGREGATION,
        deadline_in_s=task.deadline_in_s,
        secure_request=encode_message(task.request),
    )


def decode_secure_task(message: pb.Task) -> SecureTask:
    if message.phase != pb.PHASE_SECURE_AGGREGATION:
        raise ProtocolError("not a secure-aggregation task")
    if message.HasField("model") or message.WhichOneof("config") is not None:
        raise ProtocolError("a secure-aggregation task carries no model and no config")
    if not message.secure_request:
        raise ProtocolError("a secure-aggregation task lacks its request")
    request = decode_secure_request(message.secure_request)
    if isinstance(request, EncryptionRequest):
        raise ProtocolError("the encryption request travels with a fit task")
    return SecureTask(message.round, message.run_id, request, message.deadline_in_s)


def decode_secure_request(frame: bytes) -> SecureRequest:
    """The coordinator's secure-round request in a frame; a reply or bad frame is refused."""
    message = decode_message(frame)
    if not isinstance(message, ServerRequest | EncryptionRequest):
        raise ProtocolError(f"a task carries a client's {type(message).__name__}")
    return message


def decode_client_message(frame: bytes) -> SecureReply:
    """A client's secure-round reply in a frame; a request or a malformed frame is refused."""
    message = decode_message(frame)
    if not isinstance(message, ClientMessage | EncryptedUpdate):
        raise ProtocolError(f"a client sent the coordinator's {type(message).__name__}")
    return message


def encode_check_in_response(outcome: CheckInOutcome) -> pb.CheckInResponse:
    if isinstance(outcome, Task):
        return pb.CheckInResponse(task=encode_task(outcome))
    if isinstance(outcome, SecureTask):
        return pb.CheckInResponse(task=encode_secure_task(outcome))
    if isinstance(outcome, RetryAfter):
        retry = pb.RetryAfter(seconds=outcome.seconds, reason=outcome.reason)
        return pb.CheckInResponse(retry_after=retry)
    if isinstance(outcome, RunFinished):
        return pb.CheckInResponse(run_finished=pb.RunFinished(reason=one_line(outcome.reason)))
    rejected = pb.Rejected(code=encode_reject_code(outcome.code), detail=outcome.detail)
    return pb.CheckInResponse(rejected=rejected)


def decode_check_in_response(message: pb.CheckInResponse) -> CheckInOutcome:
    """What a check-in got; every text in it is one printable line (a client logs and shows it:
    a newline or an escape sequence from a coordinator would forge lines or drive the terminal)."""
    kind = message.WhichOneof("outcome")
    if kind == "task" and message.task.phase == pb.PHASE_SECURE_AGGREGATION:
        return decode_secure_task(message.task)
    if kind == "task":
        return decode_task(message.task)
    if kind == "retry_after":
        return RetryAfter(message.retry_after.seconds, one_line(message.retry_after.reason))
    if kind == "rejected":
        detail = one_line(message.rejected.detail)
        return Rejected(decode_reject_code(message.rejected.code), detail)
    if kind == "run_finished":
        return RunFinished(one_line(message.run_finished.reason))
    raise ProtocolError("a check-in response has no outcome")


# --- models, updates, evaluations ----------------------------------------------------


def encode_fetch_model_request(request: ModelRequest) -> pb.FetchModelRequest:
    return pb.FetchModelRequest(version_id=request.version_id, offset=request.offset)


def decode_fetch_model_request(message: pb.FetchModelRequest) -> ModelRequest:
    return ModelRequest(message.version_id, message.offset)


def encode_fetch_features_request(request: FeaturesRequest) -> pb.FetchFeaturesRequest:
    return pb.FetchFeaturesRequest(sha256=request.sha256 or "", offset=request.offset)


def decode_fetch_features_request(message: pb.FetchFeaturesRequest) -> FeaturesRequest:
    return FeaturesRequest(message.sha256 or None, message.offset)


def encode_chunk(chunk: Chunk) -> pb.Chunk:
    return pb.Chunk(
        offset=chunk.offset, total_size=chunk.total_size, sha256=chunk.sha256, data=chunk.data
    )


def decode_chunk(message: pb.Chunk) -> Chunk:
    return Chunk(message.offset, message.total_size, message.sha256, message.data)


def _check_matches_auth(
    message: pb.UpdateHeader
    | pb.SecureMessageHeader
    | pb.ReportEvaluationRequest
    | pb.ReportFailureRequest,
) -> None:
    """A body's round and run must be the ones its signature names."""
    if message.HasField("auth") and (
        message.round != message.auth.round or message.run_id != message.auth.run_id
    ):
        raise ProtocolError(
            f"{type(message).__name__} is about run {message.run_id!r} round {message.round} "
            f"but signed for run {message.auth.run_id!r} round {message.auth.round}"
        )


def encode_update_header(header: UpdateHeader) -> pb.UpdateHeader:
    return _checked(
        lambda: pb.UpdateHeader(
            round=header.round,
            run_id=header.run_id,
            num_examples=header.num_examples,
            metrics={str(name): float(value) for name, value in header.metrics.items()},
            payload_sha256=header.payload_sha256,
            total_size=header.total_size,
            base_model_sha256=header.base_model_sha256,
            codec=header.codec,
            features_sha256=header.features_sha256 or "",
        ),
        "update header",
    )


def decode_update_header(message: pb.UpdateHeader) -> UpdateHeader:
    _check_matches_auth(message)
    return UpdateHeader(
        round=message.round,
        run_id=message.run_id,
        num_examples=message.num_examples,
        payload_sha256=message.payload_sha256,
        total_size=message.total_size,
        base_model_sha256=message.base_model_sha256,
        metrics=dict(message.metrics),
        codec=message.codec,
        features_sha256=message.features_sha256 or None,
    )


def update_parts(
    header: pb.UpdateHeader, payload: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[pb.UpdatePart]:
    """The client-streamed messages of an upload: the (signed) header, then the chunks.

    The header's ``payload_sha256`` is the payload's (the receiver checks it):
    it is not hashed again here.
    """
    yield pb.UpdatePart(header=header)
    for chunk in chunk_payload(payload, chunk_size, sha256=header.payload_sha256):
        yield pb.UpdatePart(chunk=encode_chunk(chunk))


def header_of(part: pb.UpdatePart) -> pb.UpdateHeader:
    """The header an upload must open with; ``ProtocolError`` for anything else."""
    _check_opens_with_header(part, "an update upload")
    return part.header


def _check_opens_with_header(part: UploadPart, what: str) -> None:
    if part.WhichOneof("part") != "header":
        raise ProtocolError(f"{what} must start with its header")


def chunk_of(part: UploadPart) -> Chunk:
    """A payload chunk of an upload; ``ProtocolError`` for a second header or an empty part."""
    if part.WhichOneof("part") != "chunk":
        raise ProtocolError("after its header, an upload carries only chunks")
    return decode_chunk(part.chunk)


# --- secure-aggregation replies ------------------------------------------------------


def encode_secure_message_header(header: SecureMessageHeader) -> pb.SecureMessageHeader:
    return pb.SecureMessageHeader(
        round=header.round,
        run_id=header.run_id,
        payload_sha256=header.payload_sha256,
        total_size=header.total_size,
        features_sha256=header.features_sha256 or "",
    )


def decode_secure_message_header(message: pb.SecureMessageHeader) -> SecureMessageHeader:
    _check_matches_auth(message)
    return SecureMessageHeader(
        round=message.round,
        run_id=message.run_id,
        payload_sha256=message.payload_sha256,
        total_size=message.total_size,
        features_sha256=message.features_sha256 or None,
    )


def secure_message_parts(
    header: pb.SecureMessageHeader, frame: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[pb.SecureMessagePart]:
    """The client-streamed messages of a SecAgg+ reply: the (signed) header, then the chunks."""
    yield pb.SecureMessagePart(header=header)
    for chunk in chunk_payload(frame, chunk_size, sha256=header.payload_sha256):
        yield pb.SecureMessagePart(chunk=encode_chunk(chunk))


def secure_header_of(part: pb.SecureMessagePart) -> pb.SecureMessageHeader:
    """The header a SecAgg+ reply must open with; ``ProtocolError`` for anything else."""
    _check_opens_with_header(part, "a secure message upload")
    return part.header


def encode_evaluation_report(report: EvaluationReport) -> pb.ReportEvaluationRequest:
    return _checked(
        lambda: pb.ReportEvaluationRequest(
            round=report.round,
            run_id=report.run_id,
            loss=report.loss,
            num_examples=report.num_examples,
            metrics={str(name): float(value) for name, value in report.metrics.items()},
            model_sha256=report.model_sha256,
            features_sha256=report.features_sha256 or "",
        ),
        "evaluation report",
    )


def decode_evaluation_report(message: pb.ReportEvaluationRequest) -> EvaluationReport:
    _check_matches_auth(message)
    return EvaluationReport(
        round=message.round,
        run_id=message.run_id,
        loss=message.loss,
        num_examples=message.num_examples,
        model_sha256=message.model_sha256,
        metrics=dict(message.metrics),
        features_sha256=message.features_sha256 or None,
    )


def encode_failure_report(report: FailureReport) -> pb.ReportFailureRequest:
    return _checked(
        lambda: pb.ReportFailureRequest(
            round=report.round, run_id=report.run_id, reason=report.reason
        ),
        "failure report",
    )


def decode_failure_report(message: pb.ReportFailureRequest) -> FailureReport:
    _check_matches_auth(message)
    return FailureReport(round=message.round, run_id=message.run_id, reason=message.reason)


def encode_report_failure_response(verdict: Verdict) -> pb.ReportFailureResponse:
    return pb.ReportFailureResponse(verdict=encode_verdict(verdict))


def decode_report_failure_response(message: pb.ReportFailureResponse) -> Verdict:
    _require(message, "verdict", "ReportFailureResponse")
    return decode_verdict(message.verdict)
