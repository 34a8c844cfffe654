"""What the coordinator and a client exchange: tasks, "retry later", "the run is over", refusals.

These types are shared by the client runtime, the coordinator and the
transport, so they live below all three (see ``tests/test_layers.py`` for the
layer order). A check-in is answered by an :data:`Offer` (a
:class:`TaskOffer` to train or evaluate, or a :class:`SecureOffer` for a
stage of a secure round), a :class:`RetryLater`, or :class:`RunFinished`;
a submission the coordinator cannot count is answered by a
:class:`RejectSubmission` with its :class:`RejectReason`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.core.errors import ClientError, ProtocolError
from shoal.core.limits import MAX_LOCAL_EPOCHS
from shoal.core.pickling import pickled_by_fields
from shoal.preprocessing import Scaler, scaler_of
from shoal.registry import VersionSignature
from shoal.secure.messages import ServerRequest, Stage
from shoal.secure.serde import FitRequest


class Phase(enum.Enum):
    """What a round asks of its cohort."""

    FIT = "fit"
    EVALUATE = "evaluate"


class RejectReason(enum.Enum):
    """Why a submission was refused; each is counted in the round's summary."""

    LATE = "late"
    WRONG_ROUND = "wrong_round"
    DUPLICATE = "duplicate"
    NOT_SELECTED = "not_selected"
    WRONG_PHASE = "wrong_phase"
    INVALID_UPDATE = "invalid_update"


TRAIN_TIME_METRIC = "shoal_train_s"
"""The reserved metric a client's result carries its own training (or evaluation) time in,
seconds: the client runtime measures it, the simulator takes it from its latency model, and the
round engine books it for the straggler figures and keeps it out of the round's metrics."""


def split_train_time(metrics: Mapping[str, float]) -> tuple[Mapping[str, float], float | None]:
    """A result's metrics without :data:`TRAIN_TIME_METRIC`, and that time (None: absent or not
    a finite number of seconds >= 0)."""
    if TRAIN_TIME_METRIC not in metrics:
        return metrics, None
    rest = {name: value for name, value in metrics.items() if name != TRAIN_TIME_METRIC}
    seconds = metrics[TRAIN_TIME_METRIC]
    valid = isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0
    return rest, float(seconds) if valid else None


def check_round(round_number: int) -> None:
    """Round numbers start at 0; anything else is a malformed message."""
    if round_number < 0:
        raise ProtocolError(f"round numbers start at 0, got {round_number}")


@pickled_by_fields  # a simulation sends one per client and round to its workers
@dataclass(frozen=True, slots=True)
class FitConfig:
    """What the coordinator asks of one client in one training round.

    ``epochs`` may be fractional for a straggler allowed partial work
    (FedProx): the client then runs that share of its steps. ``batch_size``
    0 means full batch. ``seed`` makes the client's shuffling reproducible.
    """

    round: int
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 0.05
    proximal_mu: float = 0.0
    seed: int = 0
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs <= 0 or not math.isfinite(self.epochs):
            raise ClientError(f"epochs must be positive, got {self.epochs}")
        if self.epochs > MAX_LOCAL_EPOCHS:
            raise ClientError(
                f"epochs = {self.epochs:g} is above the limit of {MAX_LOCAL_EPOCHS:,} "
                "local passes in one round"
            )
        if self.batch_size < 0:
            raise ClientError(f"batch_size must be >= 0 (0 is full batch), got {self.batch_size}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):  # NaN fails too
            raise ClientError(f"learning_rate must be finite and > 0, got {self.learning_rate}")
        if not (self.proximal_mu >= 0 and math.isfinite(self.proximal_mu)):
            raise ClientError(f"proximal_mu must be finite and >= 0, got {self.proximal_mu}")

    @property
    def scaler(self) -> Scaler | None:
        """The run's feature scaler (``[preprocessing]``): standardize the local features
        with ``config.scaler.transform(x)`` before training; None when the run has none."""
        return scaler_of(self.extras)


@pickled_by_fields  # a simulation sends one per client and round to its workers
@dataclass(frozen=True, slots=True)
class EvaluateConfig:
    """What the coordinator asks of one client in one evaluation round."""

    round: int
    batch_size: int = 0
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scaler(self) -> Scaler | None:
        """The run's feature scaler (``[preprocessing]``), as :attr:`FitConfig.scaler`."""
        return scaler_of(self.extras)


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """Which committed version a task's model is, and the coordinator's signature on it.

    ``signed`` is None for a version stored unsigned; a client that pins the
    coordinator's key refuses it (see :mod:`shoal.governance.model_signing`).
    """

    name: str
    version: int
    round: int
    signed: VersionSignature | None = None
    features_sha256: str | None = None  # the run's feature module, signed with the version
    preprocessing_sha256: str | None = None  # the scaler its tasks carry, signed with it


@dataclass(frozen=True, slots=True)
class TaskOffer:
    """Work for one client: what to do, on which model, and by when.

    In a secure round, a fit offer carries the masked-input request in
    ``secure``: the client trains, then answers it (``submit_secure``) with
    its masked update; the plaintext update never leaves the client.
    ``model`` names the committed version the model is, with its signature
    (None where the coordinator named none: an unsigned model), and
    ``model_size_bytes`` the size of its download (None: not announced).
    """

    round: int
    phase: Phase
    config: FitConfig | EvaluateConfig
    model_sha256: str
    deadline_in_s: float
    secure: FitRequest | None = None
    model: ModelVersion | None = None
    model_size_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class SecureOffer:
    """A key or unmask stage of a secure round: answer ``request`` within ``deadline_in_s``."""

    round: int
    request: ServerRequest
    deadline_in_s: float


Offer = TaskOffer | SecureOffer


def offer_stage(offer: Offer) -> Stage | None:
    """The secure-aggregation stage an offer belongs to; None for a plain task."""
    if isinstance(offer, SecureOffer):
        return offer.request.stage
    return None if offer.secure is None else offer.secure.stage


@dataclass(frozen=True, slots=True)
class RetryLater:
    """No work now: check in again after ``seconds``."""

    seconds: float
    reason: str


@dataclass(frozen=True, slots=True)
class RunFinished:
    """The run is over (its last round is done, or training stopped): a client may leave."""

    reason: str


CheckInAnswer = Offer | RetryLater | RunFinished


@dataclass(frozen=True, slots=True)
class RejectSubmission:
    """A submission was refused; the shell tells the client why."""

    client_id: str
    round: int
    reason: RejectReason
    detail: str


__all__ = [
    "CheckInAnswer",
    "EvaluateConfig",
    "FitConfig",
    "Offer",
    "Phase",
    "RejectReason",
    "RejectSubmission",
    "RetryLater",
    "RunFinished",
    "SecureOffer",
    "TaskOffer",
    "check_round",
    "offer_stage",
]
