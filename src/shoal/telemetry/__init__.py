"""FL telemetry: the metrics log, MLflow, Prometheus, alerts, counted refusals, the run report.

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
from shoal.telemetry.prometheus import CoordinatorMetrics, MetricsServer, serve_metrics
from shoal.telemetry.refusals import RefusalLog, peer_host
from shoal.telemetry.report import Figure, RunData, figures, load_run, load_runs, write_report
from shoal.telemetry.tracking import MlflowTracker

__all__ = [
    "Alert",
    "AlertHook",
    "BudgetExhausted",
    "CohortDropped",
    "CommandHook",
    "CoordinatorMetrics",
    "Figure",
    "LoggingHook",
    "MetricsLog",
    "MetricsServer",
    "MlflowTracker",
    "ModelRolledBack",
    "PythonHook",
    "RefusalLog",
    "RunData",
    "alert_hooks",
    "figures",
    "fire",
    "load_run",
    "load_runs",
    "peer_host",
    "serve_metrics",
    "write_report",
]
