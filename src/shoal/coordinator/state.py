"""The round lifecycle as a literal transition table, with no I/O at all.

A round walks IDLE -> SELECTING -> CONFIGURING -> COLLECTING -> AGGREGATING ->
COMMITTING -> IDLE. External events (``StartRound``, ``UpdateReceived``...)
and the engine's own steps (``Step``) are the triggers; any pair missing from
``TRANSITIONS`` is illegal and raises :class:`IllegalTransition` before
anything changes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from shoal.coordinator.events import (
    AggregateDecrypted,
    ClientFailed,
    DeadlineReached,
    EvaluationReceived,
    Event,
    FinishRun,
    SecureMessageReceived,
    StartRound,
    UpdateReceived,
)
from shoal.core.errors import IllegalTransition


class RoundState(enum.Enum):
    """Where the coordinator stands in the current round."""

    IDLE = "idle"
    SELECTING = "selecting"
    CONFIGURING = "configuring"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    COMMITTING = "committing"
    FINISHED = "finished"


class Step(enum.Enum):
    """The engine's internal steps, which move it without an outside event."""

    COHORT_SELECTED = "cohort selected"
    TOO_FEW_CANDIDATES = "too few candidates"
    TASKS_SENT = "tasks sent"
    ROUND_CLOSED = "round closed"
    QUORUM_MET = "quorum met"
    QUORUM_MISSED = "quorum missed"
    COMMITTED = "committed"


Trigger = type[Event] | Step

_S = RoundState

TRANSITIONS: Final[Mapping[tuple[RoundState, Trigger], RoundState]] = {
    # a round starts, picks its cohort and hands out tasks
    (_S.IDLE, StartRound): _S.SELECTING,
    (_S.SELECTING, Step.COHORT_SELECTED): _S.CONFIGURING,
    (_S.SELECTING, Step.TOO_FEW_CANDIDATES): _S.IDLE,
    (_S.CONFIGURING, Step.TASKS_SENT): _S.COLLECTING,
    # results come in until the target count, the deadline, or nobody is left
    (_S.COLLECTING, UpdateReceived): _S.COLLECTING,
    (_S.COLLECTING, EvaluationReceived): _S.COLLECTING,
    (_S.COLLECTING, SecureMessageReceived): _S.COLLECTING,
    (_S.COLLECTING, AggregateDecrypted): _S.COLLECTING,
    (_S.COLLECTING, ClientFailed): _S.COLLECTING,
    (_S.COLLECTING, DeadlineReached): _S.COLLECTING,
    (_S.COLLECTING, Step.ROUND_CLOSED): _S.AGGREGATING,
    # the quorum decides between a new version and keeping the old one
    (_S.AGGREGATING, Step.QUORUM_MET): _S.COMMITTING,
    (_S.AGGREGATING, Step.QUORUM_MISSED): _S.IDLE,
    (_S.COMMITTING, Step.COMMITTED): _S.IDLE,
    # between rounds, stragglers' results and stale timers are late: rejected, counted
    (_S.IDLE, UpdateReceived): _S.IDLE,
    (_S.IDLE, EvaluationReceived): _S.IDLE,
    (_S.IDLE, SecureMessageReceived): _S.IDLE,
    (_S.IDLE, AggregateDecrypted): _S.IDLE,
    (_S.IDLE, ClientFailed): _S.IDLE,
    (_S.IDLE, DeadlineReached): _S.IDLE,
    (_S.IDLE, FinishRun): _S.FINISHED,
}


def next_state(state: RoundState, trigger: Trigger) -> RoundState:
    """The state that ``trigger`` leads to from ``state``; raises if illegal."""
    try:
        return TRANSITIONS[(state, trigger)]
    except KeyError:
        name = trigger.value if isinstance(trigger, Step) else trigger.__name__
        raise IllegalTransition(
            f"{name} is not allowed while the coordinator is {state.value}"
        ) from None
