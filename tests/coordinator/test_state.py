"""Every (state, trigger) pair of the round state machine: legal ones move, the rest raise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.coordinator import (
    TRANSITIONS,
    ClientFailed,
    Coordinator,
    DeadlineReached,
    EvaluationReceived,
    FinishRun,
    Phase,
    RoundSettings,
    RoundState,
    StartRound,
    Step,
    UpdateReceived,
    next_state,
)
from shoal.core import IllegalTransition, Parameters

EXTERNAL_EVENTS = [
    StartRound(round=1, phase=Phase.FIT, now=0.0, candidates=("a", "b")),
    UpdateReceived("a", 1, 1.0, np.zeros(3, np.float32), 5),
    EvaluationReceived("a", 1, 1.0, 0.5, 5),
    ClientFailed("a", 1, 1.0, "boom"),
    DeadlineReached(1, 2.0),
    FinishRun(),
]
TRIGGERS = [type(event) for event in EXTERNAL_EVENTS] + list(Step)


@pytest.mark.parametrize(("state", "trigger"), list(itertools.product(RoundState, TRIGGERS)))
def test_next_state_follows_the_table_or_raises(state: RoundState, trigger: object) -> None:
    if (state, trigger) in TRANSITIONS:
        assert next_state(state, trigger) is TRANSITIONS[(state, trigger)]  # type: ignore[arg-type]
    else:
        with pytest.raises(IllegalTransition):
            next_state(state, trigger)  # type: ignore[arg-type]


def _coordinator() -> Coordinator:
    return Coordinator(
        settings=RoundSettings(clients_per_round=2, over_selection=1.0, quorum=0.5),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(3)]),
        seed=0,
    )


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (state, event)
        for state, event in itertools.product(RoundState, EXTERNAL_EVENTS)
        if (state, type(event)) not in TRANSITIONS
    ],
)
def test_engine_refuses_every_illegal_event_and_changes_nothing(
    state: RoundState, event: object
) -> None:
    coordinator = _coordinator()
    coordinator.state = state
    before = coordinator.parameters.vector.copy()
    with pytest.raises(IllegalTransition):
        coordinator.handle(event)  # type: ignore[arg-type]
    assert coordinator.state is state
    np.testing.assert_array_equal(coordinator.parameters.vector, before)


def test_every_state_but_finished_has_a_way_out() -> None:
    sources = {state for state, _ in TRANSITIONS}
    assert sources == set(RoundState) - {RoundState.FINISHED}


def test_finished_is_terminal() -> None:
    coordinator = _coordinator()
    coordinator.handle(FinishRun())
    assert coordinator.state is RoundState.FINISHED
    for event in EXTERNAL_EVENTS:
        with pytest.raises(IllegalTransition):
            coordinator.handle(event)  # type: ignore[arg-type]
