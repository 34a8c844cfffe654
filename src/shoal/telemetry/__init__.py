"""FL telemetry: the metrics log, MLflow tracking, alerts, counted refusals; later, drift.

Importing this package does not import MLflow: an :class:`MlflowTracker`
does, when it is created (the ``shoal[mlflow]`` extra).
"""

from shoal.telemetry.alerts import (
    Alert,
    AlertHook,
    BudgetExhausted,
    CohortDropped,
    CommandHook,
    LoggingHook,
    ModelRolledBack,
    PythonHook,
    alert_hooks,
    fire,
)
from shoal.telemetry.metrics import MetricsLog
from shoal.telemetry.refusals import REFUSED_REQUESTS, RefusalLog, peer_host
from shoal.telemetry.tracking import MlflowTracker

__all__ = [
    "REFUSED_REQUESTS",
    "Alert",
    "AlertHook",
    "BudgetExhausted",
    "CohortDropped",
    "CommandHook",
    "LoggingHook",
    "MetricsLog",
    "MlflowTracker",
    "ModelRolledBack",
    "PythonHook",
    "RefusalLog",
    "alert_hooks",
    "fire",
    "peer_host",
]
