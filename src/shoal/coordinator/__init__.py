"""The coordinator: round lifecycle, cohort selection, aggregation and model versions."""

from shoal.coordinator.driver import DriverSettings, RetryLater, RoundDriver, TaskOffer
from shoal.coordinator.engine import Coordinator, RoundSettings
from shoal.coordinator.events import (
    Action,
    ClientFailed,
    CommitVersion,
    DeadlineReached,
    EvaluationReceived,
    Event,
    FinishRun,
    Phase,
    RejectReason,
    RejectSubmission,
    RoundClosed,
    RoundSummary,
    ScheduleDeadline,
    SendEvaluateTask,
    SendFitTask,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.selection import client_seed, cohort_size, select_cohort
from shoal.coordinator.state import TRANSITIONS, RoundState, Step, next_state

__all__ = [
    "TRANSITIONS",
    "Action",
    "ClientFailed",
    "CommitVersion",
    "Coordinator",
    "DeadlineReached",
    "DriverSettings",
    "EvaluationReceived",
    "Event",
    "FinishRun",
    "Phase",
    "RejectReason",
    "RejectSubmission",
    "RetryLater",
    "RoundClosed",
    "RoundDriver",
    "RoundSettings",
    "RoundState",
    "RoundSummary",
    "ScheduleDeadline",
    "SendEvaluateTask",
    "SendFitTask",
    "StartRound",
    "Step",
    "TaskOffer",
    "UpdateReceived",
    "client_seed",
    "cohort_size",
    "next_state",
    "select_cohort",
]
