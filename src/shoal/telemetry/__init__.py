"""FL telemetry: the run's metrics log and, later, drop rate, straggler index and drift."""

from shoal.telemetry.metrics import MetricsLog

__all__ = ["MetricsLog"]
