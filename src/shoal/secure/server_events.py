"""Events into the SecAgg+ server and actions out of it, and its stage deadlines: frozen data.

The server (:mod:`shoal.secure.server`) is sans-IO: a shell turns the world
into these events (a client's message, a stage's deadline, a client gone)
and carries out the actions it gets back (send a request, set a deadline),
until the round ends with :class:`SumReady` or :class:`Aborted`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shoal.core.errors import ProtocolError
from shoal.secure.messages import ClientMessage, ServerRequest, Stage
from shoal.secure.quantization import DecodedSum


@dataclass(frozen=True, slots=True)
class StageDeadlines:
    """Seconds each stage may last; the masked-input stage includes local training."""

    advertise_keys: float = 30.0
    share_keys: float = 30.0
    masked_input: float = 600.0
    unmask: float = 30.0
    consistency: float = 30.0

    def __post_init__(self) -> None:
        stages = (self.advertise_keys, self.share_keys, self.masked_input, self.unmask)
        if min(*stages, self.consistency) <= 0:
            raise ProtocolError("every stage deadline must be positive")

    def of(self, stage: Stage) -> float:
        return float(getattr(self, stage.name.lower()))


# --- events in ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A client's message arrived at ``now``."""

    client_id: str
    message: ClientMessage
    now: float


@dataclass(frozen=True, slots=True)
class StageDeadline:
    """The deadline the server asked for ``stage`` went off."""

    stage: Stage
    now: float


@dataclass(frozen=True, slots=True)
class ClientDropped:
    """The shell knows ``client_id`` is gone (it failed or disconnected)."""

    client_id: str
    now: float


ServerEvent = MessageReceived | StageDeadline | ClientDropped


# --- actions out -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Deliver ``request`` to ``client_id``."""

    client_id: str
    request: ServerRequest


@dataclass(frozen=True, slots=True)
class ScheduleStageDeadline:
    """Deliver ``StageDeadline(stage, at)`` when the clock reaches ``at``."""

    stage: Stage
    at: float


@dataclass(frozen=True, slots=True)
class SecureSum:
    """The outcome of a secure round: the sum of the survivors' inputs, and who took part."""

    decoded: DecodedSum
    contributors: tuple[str, ...]  # whose masked inputs are in the sum
    recovered: tuple[str, ...]  # dropped after sharing keys; their pairwise masks were rebuilt
    dropped: Mapping[str, int]  # how many clients dropped at each stage
    culprits: Mapping[str, str] = field(default_factory=dict)  # caught cheating: what they did


@dataclass(frozen=True, slots=True)
class SumReady:
    """The protocol finished: here is the sum."""

    result: SecureSum


@dataclass(frozen=True, slots=True)
class Aborted:
    """The protocol cannot finish (too few survivors or shares, a cheat); nothing was learned."""

    reason: str
    dropped: Mapping[str, int]
    culprits: Mapping[str, str] = field(default_factory=dict)  # caught cheating: what they did


ServerAction = SendRequest | ScheduleStageDeadline | SumReady | Aborted
