"""The Grafana dashboard in deploy/: every metric its queries name is one Shoal exports."""

from __future__ import annotations

import logging

from shoal.telemetry.prometheus import CoordinatorMetrics
from shoal.telemetry.refusals import RefusalLog
from support.grafana import METRIC, dashboard_queries
from support.rows import contract_row


def exported_names() -> set[str]:
    """The sample names a coordinator's registry exposes once a round, an RPC, a refusal
    and a fleet count were fed (read from the registry, not listed by hand)."""
    metrics = CoordinatorMetrics()
    metrics.observe_row(contract_row(phase="fit"))
    metrics.observe_row(contract_row())
    metrics.observe_rpc("CheckIn", "task", 0.01)
    metrics.observe_fleet(connected=3, eligible=2)
    refusals = RefusalLog(logging.getLogger("shoal.test"), counter=metrics.refused)
    refusals.refused(peer="ipv4:127.0.0.1:1", rpc="Enroll", reason="malformed", detail="x")
    return metrics.names()


def test_the_dashboard_names_only_exported_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    used = {name for query in queries for name in METRIC.findall(query)}
    unknown = used - exported_names()
    assert not unknown, f"the dashboard queries metrics Shoal does not export: {sorted(unknown)}"


def test_the_dashboard_covers_the_fleet_figures() -> None:
    used = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    for figure in (
        "shoal_round_accuracy",
        "shoal_round_drop_rate",
        "shoal_round_straggler_index",
        "shoal_round_divergence",
        "shoal_round_fairness_gap",
        "shoal_round_bytes_up_per_client",
        "shoal_privacy_epsilon",
        "shoal_rpc_duration_seconds_bucket",
        "shoal_refused_requests_total",
        "shoal_clients_connected",
        "shoal_clients_eligible",
        "shoal_rounds_total",
    ):
        assert figure in used, figure


def test_a_misspelt_metric_would_be_caught() -> None:
    assert "shoal_round_acuracy" not in exported_names()
    assert METRIC.findall("rate(shoal_rpc_duration_seconds_count[1m])") == [
        "shoal_rpc_duration_seconds_count"
    ]
