"""Events into the coordinator and actions out of it: frozen, self-validating.

The coordinator is sans-IO: a shell (the simulator or the network service)
turns the world into these events and carries out the actions it gets back.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from shoal.aggregation.divergence import DivergenceReport
from shoal.aggregation.drift import DriftReport
from shoal.core.errors import ProtocolError
from shoal.core.later import Later
from shoal.core.parameters import Parameters, Vector
from shoal.secure.messages import ClientMessage, MaskedInputRequest, ServerRequest, Stage
from shoal.tasks import (
    EvaluateConfig,
    FitConfig,
    Phase,
    RejectSubmission,
    check_round,
)

if TYPE_CHECKING:  # at run time these would import the transport package, which imports this
    from shoal.secure.ckks import EncryptedVector
    from shoal.secure.homomorphic import EncryptedUpdate, EncryptionRequest
    from shoal.secure.keyholder import ContributionReceipt


def _check_time(now: float) -> None:
    if not math.isfinite(now) or now < 0:
        raise ProtocolError(f"event time must be a finite non-negative number, got {now}")


class Authentication(enum.Enum):
    """How the shell knows who sent a submission (what the policy is told of its signature).

    ``VERIFIED``: the network service checked the request's Ed25519 signature
    against the client's enrolled key; ``IN_PROCESS``: the simulator (or an
    in-process link) delivered it itself, with no wire to forge it on;
    ``NONE``: the shell did not say, which the default policy denies.
    """

    VERIFIED = "verified"
    IN_PROCESS = "in_process"
    NONE = "none"


# --- events in ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartRound:
    """Begin round ``round`` of ``phase`` at ``now``, choosing among ``candidates``.

    ``config`` is the server app's round config (see :mod:`shoal.coordinator.app`).
    ``identities`` are the candidates' Ed25519 public keys (enrolled, or made for a
    simulation): a SecAgg+ round selects only clients that have one, and they sign with it.
    """

    round: int
    phase: Phase
    now: float
    candidates: tuple[str, ...]
    config: Mapping[str, Any] = field(default_factory=dict)  # the app's round config
    identities: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_time(self.now)
        if len(set(self.candidates)) != len(self.candidates):
            raise ProtocolError("candidate client ids must be unique")


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    """A client's training result: its update (local minus global) and weight."""

    client_id: str
    round: int
    now: float
    update: Vector
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    authentication: Authentication = Authentication.NONE
    upload_bytes: int | None = None  # what its upload took on the wire (None: not told)

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_time(self.now)
        if self.num_examples < 0:
            raise ProtocolError(f"num_examples must be >= 0, got {self.num_examples}")
        if not isinstance(self.update, np.ndarray):
            raise ProtocolError("an update must be a numpy array")
        if self.upload_bytes is not None and self.upload_bytes < 0:
            raise ProtocolError(f"upload_bytes must be >= 0, got {self.upload_bytes}")


@dataclass(frozen=True, slots=True)
class EvaluationReceived:
    """A client's evaluation result for round ``round``."""

    client_id: str
    round: int
    now: float
    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_time(self.now)
        if self.num_examples < 0:
            raise ProtocolError(f"num_examples must be >= 0, got {self.num_examples}")


@dataclass(frozen=True, slots=True)
class ClientFailed:
    """A selected client reported a failure (it raised, or gave up).

    ``kind`` names the failure for the round's ``drops_by_reason``
    (``failed:<kind>``): ``error`` (the client said why) or ``dropped`` (the
    simulated device dropped out); a short lowercase word.
    """

    client_id: str
    round: int
    now: float
    reason: str
    kind: str = "error"

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_time(self.now)
        if not (0 < len(self.kind) <= 32 and self.kind.replace("_", "").isalpha()):
            raise ProtocolError(f"a failure's kind must be a short word, got {self.kind!r}")


@dataclass(frozen=True, slots=True)
class SecureMessageReceived:
    """A client's secure-aggregation message (keys, shares, masked input, unmask shares)."""

    client_id: str
    round: int
    now: float
    message: ClientMessage | EncryptedUpdate
    authentication: Authentication = Authentication.NONE

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_time(self.now)


@dataclass(frozen=True, slots=True)
class AggregateDecrypted:
    """The key holder's answer for round ``round``: the plaintext sum, or why it refused."""

    round: int
    now: float
    total: npt.NDArray[np.float64] | None
    error: str | None = None

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_time(self.now)
        if (self.total is None) == (self.error is None):
            raise ProtocolError("a decryption answer holds either the sum or an error")


@dataclass(frozen=True, slots=True)
class DeadlineReached:
    """The timer the coordinator asked for round ``round`` (and secure ``stage``) went off."""

    round: int
    now: float
    stage: Stage | None = None

    def __post_init__(self) -> None:
        check_round(self.round)
        _check_time(self.now)


@dataclass(frozen=True, slots=True)
class FinishRun:
    """No more rounds: the coordinator closes for good."""


Event = (
    StartRound
    | UpdateReceived
    | EvaluationReceived
    | SecureMessageReceived
    | AggregateDecrypted
    | ClientFailed
    | DeadlineReached
    | FinishRun
)


# --- actions out ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendFitTask:
    """Ask ``client_id`` to train from the global ``parameters`` with ``config``.

    Under secure aggregation, ``secure`` carries the masked-input request: the
    client trains, then answers it with its masked update.
    """

    client_id: str
    round: int
    parameters: Parameters
    config: FitConfig
    secure: MaskedInputRequest | EncryptionRequest | None = None


@dataclass(frozen=True, slots=True)
class SendSecureRequest:
    """Deliver one of the secure-aggregation protocol's requests to ``client_id``."""

    client_id: str
    round: int
    request: ServerRequest


@dataclass(frozen=True, slots=True)
class SendEvaluateTask:
    """Ask ``client_id`` to evaluate the global ``parameters``."""

    client_id: str
    round: int
    parameters: Parameters
    config: EvaluateConfig


@dataclass(frozen=True, slots=True)
class RequestDecryption:
    """Ask the key holder to decrypt round ``round``'s encrypted sum, with its receipts."""

    round: int
    aggregate: EncryptedVector
    receipts: tuple[ContributionReceipt, ...]


@dataclass(frozen=True, slots=True)
class ScheduleDeadline:
    """Deliver ``DeadlineReached(round, at, stage)`` when the clock reaches ``at``."""

    round: int
    at: float
    stage: Stage | None = None


@dataclass(frozen=True, slots=True)
class FallbackReport:
    """The fallback a round took when too much of its cohort dropped (see
    :mod:`shoal.coordinator.fallback`): what, when, and what came of it."""

    kind: str  # taken: reselect, extend, abort or none
    configured: str  # the job's choice, when the round could not take it
    dropped: int  # members dropped when it was taken
    cohort: int  # the cohort's size then
    at: float  # when it was taken
    replacements: int = 0  # reselect: members asked in place of dropped ones
    extended_by_s: float = 0.0  # extend: how far the deadline moved
    note: str | None = None  # why the round took another fallback, or asked no replacement

    def fields(self) -> dict[str, Any]:
        """The report as a flat JSON object, for the round's metrics row."""
        return {
            "kind": self.kind,
            "configured": self.configured,
            "dropped": self.dropped,
            "cohort": self.cohort,
            "at": self.at,
            "replacements": self.replacements,
            "extended_by_s": self.extended_by_s,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class FleetReport:
    """What the engine saw of each client's timing in a round (see :mod:`shoal.telemetry.fleet`).

    ``round_trips`` and ``windows`` pair up per client that answered (task
    sent to result received; task sent to the round's deadline), in
    seconds of the shell's clock; ``training``: the training (or
    evaluation) times the clients reported; ``evaluations``: each counted
    evaluation's examples and accuracy; ``drops``: the asked clients that
    did not count, by reason.
    """

    round_trips: tuple[float, ...]
    windows: tuple[float, ...]
    training: tuple[float, ...]
    evaluations: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    drops: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RoundSummary:
    """What happened in one round, for metrics and for the version's record."""

    round: int
    phase: Phase
    started_at: float
    closed_at: float
    selected: int
    reported: int
    failed: int
    outstanding: int
    rejected: Mapping[str, int]
    num_examples: int
    loss: float | None
    metrics: Mapping[str, float]
    committed: bool
    abort_reason: str | None = None
    secure: SecureRoundReport | None = None
    participants: tuple[str, ...] = ()  # whose results count in the round
    failures: Mapping[str, int] = field(default_factory=dict)  # why clients failed, and how often
    policy_decisions: int = 0  # updates the policy decided on in the round
    policy_denied: Mapping[str, int] = field(default_factory=dict)  # denials by reason code
    # clients the eligibility policy turned away during the round, by criterion (the shell's tally)
    excluded: Mapping[str, int] = field(default_factory=dict)
    fallback: FallbackReport | None = None  # what the round did when too much of it dropped
    # each counted update against the aggregate: a report, or one still being measured
    # elsewhere (a simulation's idle worker), which divergence_report() waits for
    divergence: DivergenceReport | Later[DivergenceReport] | None = None
    # the counted updates projected and clustered: a report, or one still being measured
    # elsewhere (a simulation's idle worker), which drift_report() waits for
    drift: DriftReport | Later[DriftReport] | None = None
    cohort: tuple[str, ...] = ()  # every client the round asked (replacements included)
    clusters: Mapping[int, ClusterReport] = field(default_factory=dict)  # clustered FL
    fleet: FleetReport | None = None  # the clients' timings ([telemetry] enabled)
    split: ClusterSplit | None = None  # the model split into cluster models at this commit
    upload_bytes: int | None = None  # what its uploads took on the wire, where each told

    def divergence_report(self) -> DivergenceReport | None:
        """The round's divergence, waited for if it is still being measured elsewhere."""
        report = self.divergence
        return report if report is None or isinstance(report, DivergenceReport) else report.result()

    def drift_report(self) -> DriftReport | None:
        """The round's drift, waited for if it is still being measured elsewhere."""
        drift = self.drift
        return drift if drift is None or isinstance(drift, DriftReport) else drift.result()


@dataclass(frozen=True, slots=True)
class ClusterSplit:
    """A round whose commit split one model into cluster models (``[clustering] start =
    "flagged"``): how many, and how many of the round's counted clients formed each."""

    round: int
    clusters: int
    sizes: tuple[int, ...]

    def row_field(self) -> dict[str, Any]:
        """The round's ``clustered_split`` in its metrics row and audit entry."""
        return {"round": self.round, "clusters": self.clusters, "sizes": list(self.sizes)}


@dataclass(frozen=True, slots=True)
class ClusterReport:
    """One cluster's part of a round (clustered FL): its clients and their mean metrics."""

    clients: int
    num_examples: int
    metrics: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class SecureRoundReport:
    """How a secure round went: the protocol, who dropped at which stage, who was recovered,
    and who was caught cheating (to be suspended)."""

    protocol: str
    dropped: Mapping[str, int]  # by stage
    recovered: int  # dropped after sharing keys; their masks were rebuilt from shares
    aborted: bool
    culprits: Mapping[str, str] = field(default_factory=dict)  # client -> what it did


@dataclass(frozen=True, slots=True)
class CommitVersion:
    """A new global model: persist it before acting on it."""

    round: int
    parameters: Parameters
    summary: RoundSummary


@dataclass(frozen=True, slots=True)
class RoundClosed:
    """The round is over (committed, evaluated or aborted); here is its summary."""

    summary: RoundSummary


Action = (
    SendFitTask
    | SendEvaluateTask
    | SendSecureRequest
    | RequestDecryption
    | ScheduleDeadline
    | RejectSubmission
    | CommitVersion
    | RoundClosed
)
