"""The coordinator's Prometheus metrics: rows to gauges, RPCs, the fleet, and /metrics over HTTP."""

from __future__ import annotations

import math
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shoal.core.errors import TransportError
from shoal.telemetry.prometheus import (
    MAX_LABEL_VALUES,
    OTHER,
    CoordinatorMetrics,
    MetricsServer,
    serve_metrics,
)
from support.rows import contract_row


def value(metrics: CoordinatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_row_sets_every_figure_by_phase() -> None:
    metrics = CoordinatorMetrics()
    metrics.observe_row(contract_row())
    assert value(metrics, "shoal_round") == 4
    assert value(metrics, "shoal_model_version") == 3
    assert value(metrics, "shoal_rounds_total", phase="evaluate", outcome="committed") == 1
    assert value(metrics, "shoal_round_accuracy", phase="evaluate") == 0.9
    assert value(metrics, "shoal_round_accuracy", phase="fit") is None
    assert value(metrics, "shoal_round_drop_rate", phase="evaluate") == 0.2
    assert value(metrics, "shoal_round_rtt_seconds", phase="evaluate", quantile="0.99") == 3.0
    assert value(metrics, "shoal_round_train_seconds", phase="evaluate", quantile="0.9") == 1.5
    assert value(metrics, "shoal_round_deadline_share", phase="evaluate", quantile="0.5") == 0.1
    assert value(metrics, "shoal_round_divergence", phase="evaluate", quantile="1") == 0.05
    assert value(metrics, "shoal_round_drops", phase="evaluate", stage="evaluate") == 2
    assert value(metrics, "shoal_round_drops_by_reason", phase="evaluate", reason="failed:oom") == 1
    labels = {"phase": "evaluate", "device_class": "phone"}
    assert value(metrics, "shoal_cohort_participation_share", **labels) == 0.6
    assert value(metrics, "shoal_cohort_accuracy", **labels) == 0.88
    tablet = value(metrics, "shoal_cohort_accuracy", phase="evaluate", device_class="tablet")
    assert tablet is not None and math.isnan(tablet)  # recorded as null: not a number
    assert value(metrics, "shoal_round_drift_bimodal", phase="evaluate") == 1
    assert value(metrics, "shoal_round_cluster_accuracy", phase="evaluate", cluster="1") == 0.8
    assert value(metrics, "shoal_privacy_epsilon") == 1.5
    assert value(metrics, "shoal_round_bytes_up_per_client", phase="evaluate") == 100.0


def test_absent_fields_leave_their_gauges_and_rounds_are_counted_by_outcome() -> None:
    metrics = CoordinatorMetrics()
    metrics.observe_row(contract_row(phase="fit"))
    # an older run's row: counts only, no telemetry, no DP; an aborted round
    metrics.observe_row({"round": 5, "phase": "fit", "committed": False, "abort_reason": "quorum"})
    assert value(metrics, "shoal_round") == 5
    assert value(metrics, "shoal_round_straggler_index", phase="fit") == 0.2
    assert value(metrics, "shoal_privacy_epsilon") == 1.5  # a round without DP spends nothing
    assert value(metrics, "shoal_rounds_total", phase="fit", outcome="committed") == 1
    assert value(metrics, "shoal_rounds_total", phase="fit", outcome="aborted") == 1


def test_an_empty_row_and_non_figures_are_tolerated() -> None:
    metrics = CoordinatorMetrics()
    metrics.observe_row({})
    metrics.observe_row(contract_row(accuracy="high", fairness=["phone"], drops_by_stage=None))
    assert value(metrics, "shoal_rounds_total", phase="fit", outcome="aborted") == 1
    assert value(metrics, "shoal_round_accuracy", phase="evaluate") is None


def test_client_supplied_labels_are_capped() -> None:
    metrics = CoordinatorMetrics()
    reasons = {f"failed:kind-{index}": 1 for index in range(MAX_LABEL_VALUES + 10)}
    metrics.observe_row(contract_row(drops_by_reason=reasons))
    series = [
        sample
        for family in metrics.registry.collect()
        if family.name == "shoal_round_drops_by_reason"
        for sample in family.samples
    ]
    assert len(series) == MAX_LABEL_VALUES + 1
    assert value(metrics, "shoal_round_drops_by_reason", phase="evaluate", reason=OTHER) == 10


def test_rpcs_and_the_fleet() -> None:
    metrics = CoordinatorMetrics()
    metrics.observe_rpc("CheckIn", "task", 0.004)
    metrics.observe_rpc("CheckIn", "task", 0.2)
    metrics.observe_fleet(connected=7, eligible=5)
    labels = {"method": "CheckIn", "verdict": "task"}
    assert value(metrics, "shoal_rpc_duration_seconds_count", **labels) == 2
    assert value(metrics, "shoal_rpc_duration_seconds_bucket", le="0.005", **labels) == 1
    assert (
        value(metrics, "shoal_clients_connected"),
        value(metrics, "shoal_clients_eligible"),
    ) == (
        7,
        5,
    )


def test_two_coordinators_count_apart() -> None:
    first, second = CoordinatorMetrics(), CoordinatorMetrics()
    first.observe_row(contract_row())
    assert value(second, "shoal_rounds_total", phase="evaluate", outcome="committed") is None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_metrics_are_served_over_http_and_the_port_is_released() -> None:
    metrics = CoordinatorMetrics()
    metrics.observe_row(contract_row())
    port = free_port()
    endpoint = serve_metrics(metrics.registry, host="127.0.0.1", port=port)
    try:
        assert endpoint.port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        assert 'shoal_round_accuracy{phase="evaluate"} 0.9' in text
        with pytest.raises(TransportError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            serve_metrics(metrics.registry, host="127.0.0.1", port=port)  # taken
    finally:
        endpoint.close()
    with socket.socket() as again:  # released: the port can be bound again
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, as servers do
        again.bind(("127.0.0.1", port))


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as is and read until the endpoint closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as peer:
        peer.sendall(request)
        answer = b""
        while chunk := peer.recv(65536):
            answer += chunk
        return answer


@pytest.fixture
def endpoint() -> Iterator[MetricsServer]:
    metrics = CoordinatorMetrics()
    metrics.observe_row(contract_row())
    served = serve_metrics(metrics.registry, host="127.0.0.1", port=0, request_timeout_s=0.2)
    yield served
    served.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]:9464", None])
def test_on_loopback_the_metrics_answer_loopback_names(
    endpoint: MetricsServer, host: str | None
) -> None:
    header = b"" if host is None else f"Host: {host}\r\n".encode()
    answer = raw_exchange(endpoint.port, b"GET /metrics HTTP/1.0\r\n" + header + b"\r\n")
    assert answer.startswith(b"HTTP/1.0 200") and b"shoal_round_accuracy" in answer


@pytest.mark.parametrize("host", ["rebound.example.com", "rebound.example.com:9464", "10.0.0.7"])
def test_on_loopback_a_rebound_name_is_refused(endpoint: MetricsServer, host: str) -> None:
    """DNS rebinding: a page the operator visits points its own name at 127.0.0.1 and reads
    the fleet's figures; the browser sends that name, which the endpoint refuses."""
    answer = raw_exchange(endpoint.port, f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.0 403") and b"shoal_" not in answer
    assert b"CPython" not in answer  # nor tells a prober its Python


def test_a_silent_connection_is_closed(endpoint: MetricsServer) -> None:
    """Slowloris: a scrape begun and never finished does not hold a thread for ever."""
    assert raw_exchange(endpoint.port, b"GET /metrics HTTP/1.1\r\n") == b""


def test_connections_past_the_limit_are_closed() -> None:
    metrics = CoordinatorMetrics()
    limited = serve_metrics(metrics.registry, host="127.0.0.1", port=0, max_connections=1)
    try:
        with socket.create_connection(("127.0.0.1", limited.port), timeout=30) as held:
            held.sendall(b"GET /metrics HTTP/1.1\r\n")
            assert raw_exchange(limited.port, b"GET /metrics HTTP/1.0\r\n\r\n") == b""
    finally:
        limited.close()


def test_hostile_label_values_keep_the_exposition_well_formed() -> None:
    """A client's failure kind or device class with quotes, backslashes, newlines and a
    forged metric line stays one label value."""
    forged = 'x"} 1\nshoal_round_accuracy{phase="fit"} 99\n# \\'
    metrics = CoordinatorMetrics()
    metrics.observe_row(
        {
            "round": 1,
            "phase": "fit",
            "drops_by_reason": {forged: 1},
            "fairness": {forged: {"participation_share": 0.5}},
        }
    )
    text = generate_latest(metrics.registry).decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert not any(s.name == "shoal_round_accuracy" for s in samples)
    assert {s.labels.get("reason") for s in samples if "reason" in s.labels} == {forged}
