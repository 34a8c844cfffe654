"""The coordinator: round lifecycle, cohort selection, aggregation and model versions."""

from shoal.coordinator.driver import DriverSettings, RoundDriver
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.events import (
    Action,
    ClientFailed,
    CommitVersion,
    DeadlineReached,
    EvaluationReceived,
    Event,
    FallbackReport,
    FinishRun,
    RoundClosed,
    RoundSummary,
    ScheduleDeadline,
    SecureMessageReceived,
    SecureRoundReport,
    SendEvaluateTask,
    SendFitTask,
    SendSecureRequest,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.fallback import DropFallback, FallbackKind
from shoal.coordinator.rounds import RoundSettings
from shoal.coordinator.secure import SecureRound, SecureSettings
from shoal.coordinator.selection import client_seed, cohort_size, select_cohort
from shoal.coordinator.state import TRANSITIONS, RoundState, Step, next_state
from shoal.tasks import Phase, RejectReason, RejectSubmission, RetryLater, TaskOffer

__all__ = [
    "TRANSITIONS",
    "Action",
    "ClientFailed",
    "CommitVersion",
    "Coordinator",
    "DeadlineReached",
    "DriverSettings",
    "DropFallback",
    "EvaluationReceived",
    "Event",
    "FallbackKind",
    "FallbackReport",
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
    "SecureMessageReceived",
    "SecureRound",
    "SecureRoundReport",
    "SecureSettings",
    "SendEvaluateTask",
    "SendFitTask",
    "SendSecureRequest",
    "StartRound",
    "Step",
    "TaskOffer",
    "UpdateReceived",
    "client_seed",
    "cohort_size",
    "next_state",
    "select_cohort",
]
