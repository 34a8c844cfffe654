"""A coordinator's Prometheus metrics, in a registry of its own, served on ``/metrics``.

:class:`CoordinatorMetrics` holds every metric of one coordinator in its
own :class:`~prometheus_client.CollectorRegistry` (never the process-wide
default: two coordinators in one process, as tests run them, count apart).
The coordinator feeds it four ways:

- :meth:`~CoordinatorMetrics.observe_row`: each closed round's metrics row,
  as the run layer stores it. Its figures become gauges labelled by phase
  (``shoal_round_accuracy{phase="evaluate"}``), quantiles by a ``quantile``
  label, the cohort's figures by ``device_class``; a field a row lacks
  (an older run, a figure not measured) leaves its gauge as it was, and
  one recorded as null reads NaN. ``shoal_rounds_total{phase, outcome}``
  counts the rounds closed, committed or aborted.
- :meth:`~CoordinatorMetrics.observe_rpc`: each RPC's method, verdict and
  duration, in the histogram ``shoal_rpc_duration_seconds``, whose
  ``_count`` is the RPC count.
- :attr:`~CoordinatorMetrics.refused`: ``shoal_refused_requests_total{rpc,
  reason}``, what a :class:`~shoal.telemetry.refusals.RefusalLog` counts.
- :meth:`~CoordinatorMetrics.observe_fleet`: the clients seen lately and
  those eligible now.

A label whose values come from clients (a failure's reason, a device class)
keeps at most :data:`MAX_LABEL_VALUES` values; later ones are counted as
``other``, so no peer can grow the series without bound; the exposition
escapes every label value, so none can forge a line.

:func:`serve_metrics` serves ``/metrics`` from a thread: on a loopback
address it answers only loopback Host names (a web page the operator visits
cannot read the fleet's figures through DNS rebinding), it names no Python
version, and a connection silent for ``request_timeout_s`` is closed, past
``max_connections`` a new one at once
(:class:`~shoal.core.serving.BoundedThreadingMixIn`).

>>> metrics = CoordinatorMetrics()
>>> metrics.observe_row({"round": 3, "phase": "fit", "committed": True, "loss": 0.4})
>>> metrics.registry.get_sample_value("shoal_round_loss", {"phase": "fit"})
0.4
>>> server = serve_metrics(metrics.registry, host="127.0.0.1", port=9464)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from shoal.core.errors import TransportError
from shoal.core.serving import (
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT_S,
    BoundedThreadingMixIn,
    host_name,
    is_loopback,
)

MAX_LABEL_VALUES = 32
"""The most values one client-supplied label takes; the rest are ``other``."""

OTHER = "other"

# row field -> (metric name, help): one gauge per phase
_ROW_GAUGES: dict[str, tuple[str, str]] = {
    "selected": ("shoal_round_selected", "Clients the round asked."),
    "reported": ("shoal_round_reported", "Clients whose results the round counted."),
    "dropped": ("shoal_round_dropped", "Clients that failed or never answered."),
    "accuracy": ("shoal_round_accuracy", "The round's accuracy (federated evaluation or fit)."),
    "loss": ("shoal_round_loss", "The round's mean loss."),
    "drop_rate": ("shoal_round_drop_rate", "(selected - reported) / selected."),
    "straggler_index": (
        "shoal_round_straggler_index",
        "The share of the deadline the p90 client's round trip uses.",
    ),
    "fairness_gap": (
        "shoal_round_fairness_gap",
        "Mean accuracy over device classes minus the worst class's.",
    ),
    "participation_gap": (
        "shoal_round_participation_gap",
        "Largest |participation share - population share| over device classes.",
    ),
    "bytes_up": ("shoal_round_bytes_up", "Bytes the round's clients uploaded."),
    "bytes_down": ("shoal_round_bytes_down", "Bytes the round sent its clients."),
    "bytes_up_per_client": (
        "shoal_round_bytes_up_per_client",
        "Mean bytes uploaded per reporting client.",
    ),
    "bytes_down_per_client": (
        "shoal_round_bytes_down_per_client",
        "Mean bytes sent per asked client.",
    ),
    "divergence_flagged": (
        "shoal_round_divergence_flagged",
        "Updates flagged as too far from the aggregate.",
    ),
    "drift_clusters": ("shoal_round_drift_clusters", "Clusters found in the clients' updates."),
    "drift_separation": (
        "shoal_round_drift_separation",
        "Silhouette of the update clusters, in [-1, 1].",
    ),
    "drift_bimodal": ("shoal_round_drift_bimodal", "1 when the updates look bimodal."),
}
# metric name -> (help, {row field: quantile label})
_QUANTILE_GAUGES: dict[str, tuple[str, dict[str, str]]] = {
    "shoal_round_rtt_seconds": (
        "Client round-trip time (task sent to result received), by quantile.",
        {"rtt_p50_s": "0.5", "rtt_p90_s": "0.9", "rtt_p99_s": "0.99"},
    ),
    "shoal_round_train_seconds": (
        "Client training (or evaluation) time, by quantile.",
        {"train_p50_s": "0.5", "train_p90_s": "0.9", "train_p99_s": "0.99"},
    ),
    "shoal_round_deadline_share": (
        "Client round-trip time over the round's deadline, by quantile.",
        {"deadline_share_p50": "0.5", "deadline_share_p90": "0.9", "deadline_share_p99": "0.99"},
    ),
    "shoal_round_divergence": (
        "Per-client distance of the updates to the aggregate, by statistic.",
        {"divergence_median": "0.5", "divergence_p90": "0.9", "divergence_max": "1"},
    ),
}
# row field holding {key: count} -> (metric name, help, label of the key)
_TALLY_GAUGES: dict[str, tuple[str, str, str]] = {
    "drops_by_stage": ("shoal_round_drops", "Clients the round lost, by stage.", "stage"),
    "drops_by_reason": (
        "shoal_round_drops_by_reason",
        "Clients the round lost, by reason.",
        "reason",
    ),
    "cluster_sizes": ("shoal_round_cluster_size", "Clients in each model's cluster.", "cluster"),
    "cluster_accuracy": (
        "shoal_round_cluster_accuracy",
        "Federated accuracy of each cluster's model.",
        "cluster",
    ),
}
# a cohort's figure in the row's "fairness" table -> (metric name, help)
_COHORT_GAUGES: dict[str, tuple[str, str]] = {
    "population_share": (
        "shoal_cohort_population_share",
        "A device class's share of the population.",
    ),
    "participation_share": (
        "shoal_cohort_participation_share",
        "A device class's share of the round's reporting clients.",
    ),
    "accuracy": ("shoal_cohort_accuracy", "A device class's federated-evaluation accuracy."),
}
_PRIVACY_GAUGES: dict[str, tuple[str, str]] = {
    "epsilon": ("shoal_privacy_epsilon", "The privacy budget spent so far (epsilon)."),
    "delta": ("shoal_privacy_delta", "The delta the epsilon spent is stated for."),
}
_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def refused_requests(registry: CollectorRegistry) -> Counter:
    """``shoal_refused_requests_total{rpc, reason}`` in ``registry``."""
    return Counter(
        "shoal_refused_requests",
        "Requests a Shoal service refused, by RPC and reason (the verdict's code).",
        ["rpc", "reason"],
        registry=registry,
    )


def _number(value: Any) -> float | None:
    """A row value as a gauge reading: numbers and booleans as floats, null as NaN."""
    if value is None:
        return math.nan
    if isinstance(value, bool | int | float):
        return float(value)
    return None  # anything else is not a figure


def _set(gauge: Gauge, row: Mapping[str, Any], field: str, **labels: str) -> None:
    """Set ``gauge`` (its child of ``labels``) to ``row[field]``; an absent field or a value
    that is not a figure creates no series and changes nothing."""
    if field not in row:
        return
    value = _number(row[field])
    if value is not None:
        (gauge.labels(**labels) if labels else gauge).set(value)


class _Labels:
    """The values one label has taken, capped: past the cap, a new value reads ``other``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: object) -> str:
        label = str(value)
        if label in self.seen:
            return label
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(label)
        return label


class CoordinatorMetrics:
    """Every Prometheus metric of one coordinator, in :attr:`registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.round = Gauge("shoal_round", "The last round closed.", registry=registry)
        self.model_version = Gauge(
            "shoal_model_version", "The model version of the last round closed.", registry=registry
        )
        self.rounds = Counter(
            "shoal_rounds",
            "Rounds closed, by phase and outcome.",
            ["phase", "outcome"],
            registry=registry,
        )
        self.row_gauges = {
            field: Gauge(name, text, ["phase"], registry=registry)
            for field, (name, text) in _ROW_GAUGES.items()
        }
        self.quantile_gauges = {
            name: Gauge(name, text, ["phase", "quantile"], registry=registry)
            for name, (text, _) in _QUANTILE_GAUGES.items()
        }
        self.tally_gauges = {
            field: Gauge(name, text, ["phase", label], registry=registry)
            for field, (name, text, label) in _TALLY_GAUGES.items()
        }
        self.cohort_gauges = {
            figure: Gauge(name, text, ["phase", "device_class"], registry=registry)
            for figure, (name, text) in _COHORT_GAUGES.items()
        }
        self.privacy_gauges = {
            field: Gauge(name, text, registry=registry)
            for field, (name, text) in _PRIVACY_GAUGES.items()
        }
        self.rpc_duration = Histogram(
            "shoal_rpc_duration_seconds",
            "RPCs served, by method and verdict, and how long each took.",
            ["method", "verdict"],
            buckets=_RPC_BUCKETS,
            registry=registry,
        )
        self.refused = refused_requests(registry)
        self.clients_connected = Gauge(
            "shoal_clients_connected", "Clients seen (checked in) lately.", registry=registry
        )
        self.clients_eligible = Gauge(
            "shoal_clients_eligible", "Clients a round could select now.", registry=registry
        )
        self._labels = {name: _Labels() for name in ("reason", "device_class", "stage", "cluster")}
        self._verdicts = _Labels()

    # --- the rounds ----------------------------------------------------------------------

    def observe_row(self, row: Mapping[str, Any]) -> None:
        """Set the gauges from a closed round's metrics row and count the round."""
        phase = str(row.get("phase", "fit"))
        outcome = "committed" if row.get("committed") else "aborted"
        self.rounds.labels(phase=phase, outcome=outcome).inc()
        _set(self.round, row, "round")
        _set(self.model_version, row, "model_version")
        for field, gauge in self.row_gauges.items():
            _set(gauge, row, field, phase=phase)
        for name, (_, quantiles) in _QUANTILE_GAUGES.items():
            gauge = self.quantile_gauges[name]
            for field, quantile in quantiles.items():
                _set(gauge, row, field, phase=phase, quantile=quantile)
        for field, (_, _, label) in _TALLY_GAUGES.items():
            tally = row.get(field)
            if isinstance(tally, Mapping):
                self._set_tally(self.tally_gauges[field], tally, phase=phase, label=label)
        fairness = row.get("fairness")
        if isinstance(fairness, Mapping):
            self._set_cohorts(fairness, phase=phase)
        for field, gauge in self.privacy_gauges.items():
            if row.get(field) is not None:  # a round without DP leaves the budget as it was
                _set(gauge, row, field)

    def _set_tally(self, gauge: Gauge, tally: Mapping[str, Any], *, phase: str, label: str) -> None:
        values: dict[str, float] = {}
        for key, count in tally.items():
            value = _number(count)
            if value is not None:
                name = self._labels[label](key)
                values[name] = values.get(name, 0.0) + value
        for name, value in values.items():
            gauge.labels(phase, name).set(value)

    def _set_cohorts(self, fairness: Mapping[str, Any], *, phase: str) -> None:
        for device_class, figures in fairness.items():
            if not isinstance(figures, Mapping):
                continue
            label = self._labels["device_class"](device_class)
            for figure, gauge in self.cohort_gauges.items():
                _set(gauge, figures, figure, phase=phase, device_class=label)

    # --- the service ---------------------------------------------------------------------

    def observe_rpc(self, method: str, verdict: str, seconds: float) -> None:
        """Count an RPC served, with its verdict and how long it took."""
        self.rpc_duration.labels(method=method, verdict=self._verdicts(verdict)).observe(seconds)

    def observe_fleet(self, *, connected: int, eligible: int) -> None:
        """The clients seen lately, and those a round could select now."""
        self.clients_connected.set(connected)
        self.clients_eligible.set(eligible)

    def names(self) -> set[str]:
        """Every sample name the registry exposes now (``shoal_rounds_total``, ``..._bucket``)."""
        return {sample.name for family in self.registry.collect() for sample in family.samples}


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint: its address, and how to stop it."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Server(BoundedThreadingMixIn, WSGIServer):
    pass


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A scrape is not news (Prometheus asks every few seconds)."""


def guarded(app: WsgiApp, *, loopback: bool) -> WsgiApp:
    """``app`` naming no Python version (its own ``Server`` header replaces wsgiref's); with
    ``loopback``, answering 403 to a request whose Host header names another machine."""

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def named(status: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
            return start_response(status, [*headers, ("Server", "shoal-metrics")], *rest)

        sent = environ.get("HTTP_HOST")
        if loopback and sent and not is_loopback(host_name(sent, default="")):
            named("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"unexpected Host header\n"]
        return app(environ, named)

    return serve


def serve_metrics(
    registry: CollectorRegistry,
    *,
    host: str,
    port: int,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> MetricsServer:
    """Serve ``registry`` over HTTP on ``host:port`` (``/metrics``; port 0: any free one)
    from a daemon thread; on loopback, to loopback Host names only."""
    address = host.strip("[]")
    app = guarded(make_wsgi_app(registry), loopback=is_loopback(address))
    server_class = _Server6 if ":" in address else _Server
    try:
        server = server_class(
            (address, port),
            _Handler,
            request_timeout_s=request_timeout_s,
            max_connections=max_connections,
        )
    except OSError as exc:
        # an environment problem (exit 1), as for coordinator.listen: the setting may be right
        raise TransportError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    server.set_app(app)
    thread = Thread(target=server.serve_forever, name="shoal-metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread)
