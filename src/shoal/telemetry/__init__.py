"""FL telemetry: the metrics log, MLflow tracking and alerts; later, drop rate, stragglers, drift.

Importing this package does not import MLflow: an :class:`MlflowTracker`
does, when it is created (the ``shoal[mlflow]`` extra).
"""

from shoal.telemetry.alerts import (
    Alert,
    AlertHook,
    BudgetExhausted,
    CommandHook,
    LoggingHook,
    PythonHook,
    alert_hooks,
    fire,
)
from shoal.telemetry.metrics import MetricsLog
from shoal.telemetry.tracking import MlflowTracker

__all__ = [
    "Alert",
    "AlertHook",
    "BudgetExhausted",
    "CommandHook",
    "LoggingHook",
    "MetricsLog",
    "MlflowTracker",
    "PythonHook",
    "alert_hooks",
    "fire",
]
