"""The typed messages of the coordinator protocol: frozen dataclasses that validate themselves.

Each mirrors a message of ``proto/shoal/v1/coordinator.proto``; ``serde``
converts between the two. Construction checks what a well-behaved peer
always sends (sizes, hash formats, ranges) and raises ``ProtocolError``
otherwise, so that a malformed message is refused before it reaches the
coordinator. What only the coordinator can judge (a NaN loss, the wrong
round) is left to it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from shoal.client.api import EvaluateConfig, FitConfig
from shoal.core.device import DeviceState
from shoal.core.digests import check_sha256_hex
from shoal.core.errors import ProtocolError
from shoal.governance.attestation import Evidence
from shoal.secure.homomorphic import EncryptionRequest
from shoal.secure.messages import MaskedInputRequest, ServerRequest
from shoal.secure.serde import FitRequest, SecureRequest
from shoal.tasks import ModelVersion, Phase, RejectReason, RunFinished, check_round

_MAX_TEXT = 256
MAX_METRICS = 64
"""The most metrics one result carries: each becomes a field of the round's row and an MLflow
metric, so a client must not add them by the thousand."""
MAX_METRIC_NAME_CHARS = 128
ED25519_PUBLIC_KEY_BYTES = 32


class RejectCode(enum.Enum):
    """Why a request was refused: the coordinator's reasons plus the transport's own."""

    LATE = "late"
    WRONG_ROUND = "wrong_round"
    DUPLICATE = "duplicate"
    NOT_SELECTED = "not_selected"
    WRONG_PHASE = "wrong_phase"
    INVALID_UPDATE = "invalid_update"
    WRONG_MODEL_HASH = "wrong_model_hash"
    OVERSIZED = "oversized"
    UNKNOWN_CLIENT = "unknown_client"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED = "replayed"
    MALFORMED = "malformed"
    INCOMPATIBLE = "incompatible"
    SUSPENDED = "suspended"
    BAD_TOKEN = "bad_token"
    UNATTESTED = "unattested"

    @classmethod
    def from_reason(cls, reason: RejectReason) -> RejectCode:
        """The wire code of one of the coordinator's rejection reasons."""
        return cls(reason.value)


def one_line(text: str) -> str:
    """``text`` as one printable line of at most 256 characters (control characters as spaces)."""
    return "".join(c if c.isprintable() else " " for c in text)[:_MAX_TEXT]


def _check_text(value: str, what: str, *, required: bool = False) -> None:
    if required and not value:
        raise ProtocolError(f"{what} must not be empty")
    if len(value) > _MAX_TEXT:
        raise ProtocolError(f"{what} is longer than {_MAX_TEXT} characters")


def _check_metrics(metrics: Mapping[str, float]) -> None:
    """At most :data:`MAX_METRICS`, each named by 1 to :data:`MAX_METRIC_NAME_CHARS`
    printable characters (a name goes into logs, the run's rows and MLflow)."""
    if len(metrics) > MAX_METRICS:
        raise ProtocolError(f"a result carries at most {MAX_METRICS} metrics, got {len(metrics)}")
    for name in metrics:
        if not (0 < len(name) <= MAX_METRIC_NAME_CHARS and name.isprintable()):
            raise ProtocolError(
                f"a metric's name has 1 to {MAX_METRIC_NAME_CHARS} printable characters, "
                f"got {one_line(name)[:40]!r}"
            )


def _check_count(value: int, what: str) -> None:
    if value < 0:
        raise ProtocolError(f"{what} must be >= 0, got {value}")


def _check_duration(value: float, what: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ProtocolError(f"{what} must be a finite number of seconds >= 0, got {value}")


@dataclass(frozen=True, slots=True)
class EnrollmentRequest:
    """A client asks to join: its device, its Ed25519 public key, its enrollment token.

    ``evidence`` is its attestation, made for this request (None: it attests nothing).
    """

    device: DeviceState
    public_key: bytes
    enrollment_token: str
    evidence: Evidence | None = None

    def __post_init__(self) -> None:
        if len(self.public_key) != ED25519_PUBLIC_KEY_BYTES:
            raise ProtocolError(f"an Ed25519 public key has 32 bytes, got {len(self.public_key)}")
        _check_text(self.enrollment_token, "enrollment token", required=True)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What an accepted enrollment grants: the client's id, and when it expires (or never)."""

    client_id: str
    expires_at: float | None = None

    def __post_init__(self) -> None:
        _check_text(self.client_id, "client id", required=True)
        if self.expires_at is not None and not (
            math.isfinite(self.expires_at) and self.expires_at > 0
        ):
            raise ProtocolError(f"expires_at must be a positive timestamp, got {self.expires_at}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to a submission: accepted (``code`` is None), or rejected with a code."""

    accepted: bool
    code: RejectCode | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.accepted != (self.code is None):
            raise ProtocolError("a verdict has a reject code exactly when it is not accepted")

    @classmethod
    def accept(cls, detail: str = "") -> Verdict:
        return cls(True, None, detail)

    @classmethod
    def reject(cls, code: RejectCode, detail: str) -> Verdict:
        return cls(False, code, detail)


@dataclass(frozen=True, slots=True)
class EnrollReply:
    """The coordinator's answer to an enrollment; credentials exactly when accepted."""

    verdict: Verdict
    credentials: Credentials | None = None

    def __post_init__(self) -> None:
        if self.verdict.accepted != (self.credentials is not None):
            raise ProtocolError("an enrollment reply carries credentials exactly when accepted")


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which global model a task uses: its version, content sha256, and download size.

    ``version`` names the committed version with the coordinator's signature
    on it (on the wire, the signature's run is the task's run).
    """

    version_id: str
    sha256: str
    size_bytes: int
    version: ModelVersion | None = None

    def __post_init__(self) -> None:
        _check_text(self.version_id, "model version id", required=True)
        check_sha256_hex(self.sha256, "model sha256")
        _check_count(self.size_bytes, "model size")
        if self.version is not None:
            _check_model_version(self.version)


def _check_model_version(version: ModelVersion) -> None:
    _check_text(version.name, "model name", required=True)
    _check_count(version.version, "model version")
    _check_count(version.round, "model round")
    if version.signed is not None:  # its bytes are the verifier's to judge, with a reason
        _check_text(version.signed.key_id, "signing key id")
        if len(version.signed.signature) > _MAX_TEXT:
            raise ProtocolError(f"a model signature is longer than {_MAX_TEXT} bytes")


@dataclass(frozen=True, slots=True)
class Task:
    """Work for one client: train or evaluate ``model`` in ``round``, within ``deadline_in_s``.

    In a secure round, a fit task carries the SecAgg+ masked-input request (or a
    homomorphic round's encryption request) in ``secure``: the client trains,
    then sends its masked (or encrypted) update, never the update.
    """

    round: int
    run_id: str
    phase: Phase
    model: ModelRef
    config: FitConfig | EvaluateConfig
    deadline_in_s: float
    secure: FitRequest | None = None

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_text(self.run_id, "run id", required=True)
        expected = FitConfig if self.phase is Phase.FIT else EvaluateConfig
        if not isinstance(self.config, expected):
            raise ProtocolError(f"a {self.phase.value} task needs a {expected.__name__}")
        if self.config.round != self.round:
            raise ProtocolError(f"task for round {self.round} has a config for {self.config.round}")
        _check_duration(self.deadline_in_s, "deadline_in_s")
        if self.secure is not None:
            if self.phase is not Phase.FIT or not isinstance(
                self.secure, MaskedInputRequest | EncryptionRequest
            ):
                raise ProtocolError(
                    "only a fit task carries a request: the masked-input or the encryption one"
                )
            _check_secure_round(self.secure, self.round)


@dataclass(frozen=True, slots=True)
class SecureTask:
    """A key or unmask stage of a secure round: answer ``request`` within ``deadline_in_s``.

    It needs no model; the masked-input request travels with a fit :class:`Task`.
    """

    round: int
    run_id: str
    request: ServerRequest
    deadline_in_s: float

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_text(self.run_id, "run id", required=True)
        if isinstance(self.request, MaskedInputRequest):
            raise ProtocolError("the masked-input request travels with a fit task")
        _check_secure_round(self.request, self.round)
        _check_duration(self.deadline_in_s, "deadline_in_s")


def _check_secure_round(request: SecureRequest, round_number: int) -> None:
    if request.round != round_number:
        raise ProtocolError(
            f"a task of round {round_number} carries a {request.stage.label} request "
            f"of round {request.round}"
        )


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """No work now: check in again after ``seconds`` (the coordinator's pace steering)."""

    seconds: float
    reason: str = ""

    def __post_init__(self) -> None:
        _check_duration(self.seconds, "retry-after seconds")


@dataclass(frozen=True, slots=True)
class Rejected:
    """A check-in refused for good reason (unknown, suspended or incompatible client...)."""

    code: RejectCode
    detail: str = ""


CheckInOutcome = Task | SecureTask | RetryAfter | Rejected | RunFinished


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """Ask for a model version's bytes, from ``offset`` on (to resume a broken download)."""

    version_id: str
    offset: int = 0

    def __post_init__(self) -> None:
        _check_text(self.version_id, "model version id", required=True)
        _check_count(self.offset, "offset")


@dataclass(frozen=True, slots=True)
class FeaturesRequest:
    """Ask for the run's feature module: the one with ``sha256`` (None: the run's, whichever
    it is), from ``offset`` on."""

    sha256: str | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.sha256 is not None:
            check_sha256_hex(self.sha256, "feature module sha256")
        _check_count(self.offset, "offset")


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a byte payload; each chunk repeats the payload's total size and sha256."""

    offset: int
    total_size: int
    sha256: str
    data: bytes

    def __post_init__(self) -> None:
        _check_count(self.offset, "chunk offset")
        _check_count(self.total_size, "chunk total size")
        check_sha256_hex(self.sha256, "chunk sha256")
        if self.offset + len(self.data) > self.total_size:
            raise ProtocolError(
                f"chunk [{self.offset}, {self.offset + len(self.data)}) runs past "
                f"the payload's {self.total_size} bytes"
            )


@dataclass(frozen=True, slots=True)
class UpdateHeader:
    """The first message of an update upload: what the payload chunks that follow are."""

    round: int
    run_id: str
    num_examples: int
    payload_sha256: str
    total_size: int
    base_model_sha256: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    codec: str = ""  # the payload's codec (shoal.core.compression); empty: safetensors
    features_sha256: str | None = None  # the feature module the client computed with

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_text(self.run_id, "run id", required=True)
        _check_count(self.num_examples, "num_examples")
        check_sha256_hex(self.payload_sha256, "payload sha256")
        _check_count(self.total_size, "total size")
        check_sha256_hex(self.base_model_sha256, "base model sha256")
        _check_metrics(self.metrics)
        _check_text(self.codec, "codec")
        if self.features_sha256 is not None:
            check_sha256_hex(self.features_sha256, "feature module sha256")


@dataclass(frozen=True, slots=True)
class SecureMessageHeader:
    """The first message of a secure-aggregation reply: what the frame's chunks that follow are."""

    round: int
    run_id: str
    payload_sha256: str
    total_size: int
    features_sha256: str | None = None  # the feature module the client computed with

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_text(self.run_id, "run id", required=True)
        check_sha256_hex(self.payload_sha256, "payload sha256")
        _check_count(self.total_size, "total size")
        if self.features_sha256 is not None:
            check_sha256_hex(self.features_sha256, "feature module sha256")


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    """A client's evaluation of ``model_sha256`` in ``round``."""

    round: int
    run_id: str
    loss: float
    num_examples: int
    model_sha256: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    features_sha256: str | None = None  # the feature module the client computed with

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_text(self.run_id, "run id", required=True)
        _check_count(self.num_examples, "num_examples")
        check_sha256_hex(self.model_sha256, "model sha256")
        _check_metrics(self.metrics)
        if self.features_sha256 is not None:
            check_sha256_hex(self.features_sha256, "feature module sha256")


@dataclass(frozen=True, slots=True)
class FailureReport:
    """A client gives up on its task of ``round``; ``reason`` goes to the coordinator's log."""

    round: int
    run_id: str
    reason: str

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_text(self.run_id, "run id", required=True)
        _check_text(self.reason, "failure reason")
        if not self.reason.isprintable():
            raise ProtocolError("a failure reason is one line of printable text")

    @classmethod
    def summarizing(cls, round: int, run_id: str, reason: str) -> FailureReport:
        """The report of any ``reason``: control characters become spaces, the rest is cut."""
        return cls(round, run_id, one_line(reason))


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    """The coordinator's answer to a heartbeat, with when to send the next one."""

    verdict: Verdict
    next_heartbeat_in_s: float

    def __post_init__(self) -> None:
        _check_duration(self.next_heartbeat_in_s, "next_heartbeat_in_s")
