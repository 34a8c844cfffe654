"""What a client asks of its coordinator: one request type per call, and a link with one method.

A link carries a request and returns its answer, ``await link.handle(enrollment,
request)``, the pattern of httpx's transports: the gRPC link, the in-process
link of tests and benchmarks, and any test double implement that one method.
Each request type names the answer it gets (``CheckIn`` gets a
:data:`~shoal.tasks.CheckInAnswer`, ``FetchModel`` the model), so a new call
is a request type here, its codec in ``shoal.transport.serde``, and its
handler on each side.

Every call may raise :class:`~shoal.core.errors.TransportError` (the runtime
retries it), :class:`~shoal.core.errors.NotFoundError` (gone for good) or
:class:`~shoal.core.errors.SecurityError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from shoal.core.device import DeviceState
from shoal.core.parameters import Parameters
from shoal.governance.attestation import Attester
from shoal.secure.serde import SecureReply
from shoal.tasks import CheckInAnswer, Offer, RejectSubmission, TaskOffer

T = TypeVar("T")
Submitted = RejectSubmission | None
"""The answer to a submission: the refusal, or None when it counted."""


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A client's durable identity: its id and its Ed25519 key pair."""

    client_id: str
    private_key: bytes = field(repr=False)
    public_key: bytes


class Request(Generic[T]):
    """A call to the coordinator whose answer is a ``T``."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Enroll(Request[None]):
    """Join the federation (or rejoin it) with this device's state.

    With an ``attester``, the link attaches evidence made for this very
    request (bound to its nonce, see :class:`~shoal.governance.Binding`).
    """

    state: DeviceState
    attester: Attester | None = None


@dataclass(frozen=True, slots=True)
class CheckIn(Request[CheckInAnswer]):
    """Ask for work: a task, a secure stage, "retry later", or "the run has finished".

    Attested like :class:`Enroll` when an ``attester`` is given.
    """

    state: DeviceState
    attester: Attester | None = None


@dataclass(frozen=True, slots=True)
class FetchModel(Request[Parameters]):
    """Download the global model with this sha256 (verified on arrival).

    ``size_bytes`` is the size its task announced: a download that declares
    another is refused before a byte of it is kept (None: any size the link accepts).
    """

    sha256: str
    size_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class FetchFeatures(Request[bytes | None]):
    """Download the run's feature module: the one with ``sha256`` (verified on arrival), or,
    with None, the run's, whichever it is. The answer is None when the run has none."""

    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class SubmitUpdate(Request[Submitted]):
    """A fit task's update (local minus global), its weight and metrics; compressed, the
    ``payload`` that goes up in its place, in the task's ``codec``. ``features_sha256``:
    the feature module the client computed its features with (None: none)."""

    offer: TaskOffer
    update: Parameters
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    payload: bytes | None = None
    codec: str = ""
    features_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class SubmitEvaluation(Request[Submitted]):
    """An evaluation task's loss, examples and metrics (``features_sha256`` as an update's)."""

    offer: TaskOffer
    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    features_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class SubmitSecure(Request[Submitted]):
    """A secure round's reply: keys, shares, the masked or encrypted input, unmask shares
    (``features_sha256`` as an update's)."""

    message: SecureReply
    features_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class ReportFailure(Request[None]):
    """Give up on ``offer`` at once, so that its round stops waiting for this client."""

    offer: Offer
    reason: str


class CoordinatorLink(Protocol):
    """A transport to the coordinator: one method, request in, answer out."""

    async def handle(self, enrollment: Enrollment, request: Request[T]) -> T: ...
