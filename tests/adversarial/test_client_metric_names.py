"""A client names its own metrics: after the run's own figures, by the thousand, or unprintable.

A result's metrics go into the round's row by name, and from there to the
dashboard, Prometheus, the report and MLflow. A client (here a real client
runtime over gRPC, its app changed) that calls a metric ``epsilon`` in a run
without differential privacy, or ``drift_bimodal``, must not be read as the
run's own privacy budget or drift; its other metrics still count. A result
with thousands of metrics, or a name no log should print, is refused on the
wire.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.config import parse_config
from shoal.core import Parameters, ProtocolError
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.messages import MAX_METRIC_NAME_CHARS, MAX_METRICS
from support.jobs import network_job, serve_to_digits_clients

pytestmark = pytest.mark.timeout(180)

TOKEN = "metric-names"
CLIENTS = 3
IMPERSONATED = {
    "epsilon": 0.01,  # privacy is off: the dashboard and /metrics would show a budget spent
    "delta": 1e-9,
    "drift_bimodal": 1.0,  # drift is not measured in this run
    "drift_clusters": 2.0,
    "divergence_median": 0.0,
    "canary_exposure": 0.0,
}


class Impersonating(Client):
    """The digits client, its metrics joined by names the run's telemetry writes."""

    def __init__(self, inner: Client) -> None:
        self.inner = inner

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        result = self.inner.fit(parameters, config)
        metrics = {**result.metrics, **IMPERSONATED, "app_f1": 0.5}
        return FitResult(result.parameters, result.num_examples, metrics, result.is_update)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return self.inner.evaluate(parameters, config)


def test_a_metric_named_after_a_run_figure_is_left_out_of_the_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_config(
        network_job(
            tmp_path,
            run_id="names",
            token=TOKEN,
            clients=CLIENTS,
            per_round=CLIENTS,
            run={"name": "names", "rounds": 2},
            round={"deadline_s": 60.0},
            drift={"enabled": False},
            divergence={"enabled": False},
        )
    )
    rows: list[dict[str, Any]] = []
    with caplog.at_level(logging.WARNING):
        asyncio.run(
            serve_to_digits_clients(
                tmp_path,
                config,
                clients=CLIENTS,
                token=TOKEN,
                on_round=rows.append,
                wrap=Impersonating,
                timeout_s=120,
            )
        )
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert not set(IMPERSONATED) & set(row), row
        assert row["app_f1"] == pytest.approx(0.5)  # an app's own metric still counts
    assert "epsilon" in caplog.text and "left out" in caplog.text


def header(metrics: dict[str, float]) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        round=1,
        run_id="run",
        num_examples=1,
        metrics=metrics,
        payload_sha256="0" * 64,
        total_size=1,
        base_model_sha256="0" * 64,
    )


def evaluation(metrics: dict[str, float]) -> pb.ReportEvaluationRequest:
    return pb.ReportEvaluationRequest(
        round=1, run_id="run", loss=0.1, num_examples=1, metrics=metrics, model_sha256="0" * 64
    )


@pytest.mark.parametrize(
    "metrics",
    [
        {f"m{index}": 1.0 for index in range(MAX_METRICS + 1)},  # each a row field, an MLflow key
        {"x" * (MAX_METRIC_NAME_CHARS + 1): 1.0},
        {"": 1.0},
        {"loss\nWARNING forged log line": 1.0},
    ],
    ids=["too many", "too long", "empty", "control character"],
)
def test_a_result_with_metrics_no_run_could_keep_is_refused_on_the_wire(
    metrics: dict[str, float],
) -> None:
    with pytest.raises(ProtocolError, match="metric"):
        serde.decode_update_header(header(metrics))
    with pytest.raises(ProtocolError, match="metric"):
        serde.decode_evaluation_report(evaluation(metrics))


def test_a_result_with_an_app_s_metrics_is_decoded() -> None:
    metrics = {f"metric {index}": float(index) for index in range(MAX_METRICS)}
    assert serde.decode_update_header(header(metrics)).metrics == metrics
    assert serde.decode_evaluation_report(evaluation(metrics)).metrics == metrics
