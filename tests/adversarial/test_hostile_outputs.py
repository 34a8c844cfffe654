"""What clients report, on the coordinator's outputs: its row, summary, round notes and books.

A served coordinator (the one ``shoal coordinator serve`` runs, in this
process) and real client runtimes over gRPC, their app changed to report
what an attacker would. Each attack was reproduced before its fix:

- A metric named after a field the run reads back as its own, in a run that
  did not write that field, went into the row as a number: ``playbook`` in
  an evaluation failed the run's summary at the end (``'float' object has no
  attribute 'get'``: no ``summary.json``), ``clustered_split`` failed the
  round's notes that ``shoal coordinator serve`` prints under its line.
- A cohort whose clients each named 64 metrics of their own put them all in
  the round's row (5 clients: 320 fields; 1,000 clients: 64,000), and so in
  each MLflow step and each version's stored metrics.
- An evaluation reporting a NaN accuracy made its device class's accuracy
  NaN, and the fairness gap with it, though the round's mean left it out.
- The report drew a fit row's ``accuracy`` as the "central test" line: in a
  run whose server app evaluates nothing, that is the clients' own figure.

What reaches the report, the dashboard, Prometheus and the log as text
(device classes, metric names, failure reasons with markup or control
characters) was refused on the wire or escaped already:
``test_hostile_run_folder``, ``test_client_metric_names`` and the
dashboard's and Prometheus' own tests hold that.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.cli.simulate import round_notes
from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.config import parse_config
from shoal.coordinator import (
    Coordinator,
    RoundClosed,
    RoundSettings,
    SendFitTask,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.engine import ALWAYS_BOOKED, MAX_ROUND_METRIC_NAMES, metric_names_left_out
from shoal.coordinator.records import tracked_metrics
from shoal.core import Parameters
from shoal.tasks import Phase
from shoal.telemetry.metric_names import is_run_figure
from shoal.telemetry.metrics import METRICS_FILE, SUMMARY_FILE
from shoal.telemetry.plots import RunData, figures
from shoal.transport.messages import MAX_METRICS
from support.jobs import network_job, serve_to_digits_clients

pytestmark = pytest.mark.timeout(180)

TOKEN = "hostile-outputs"
Metrics = dict[str, float]


class Reporting(Client):
    """The digits client, its metrics changed by ``fit_metrics`` and ``evaluate_metrics``
    (each given the client's index and its own metrics)."""

    def __init__(
        self,
        inner: Client,
        index: int,
        *,
        fit_metrics: Callable[[int, Metrics], Metrics],
        evaluate_metrics: Callable[[int, Metrics], Metrics],
    ) -> None:
        self.inner = inner
        self.index = index
        self.fit_metrics = fit_metrics
        self.evaluate_metrics = evaluate_metrics

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        result = self.inner.fit(parameters, config)
        metrics = self.fit_metrics(self.index, dict(result.metrics))
        return FitResult(result.parameters, result.num_examples, metrics, result.is_update)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        result = self.inner.evaluate(parameters, config)
        metrics = self.evaluate_metrics(self.index, dict(result.metrics))
        return EvaluateResult(result.loss, result.num_examples, metrics)


def as_reported(index: int, metrics: Metrics) -> Metrics:
    return metrics


def serve_reporting(
    tmp_path: Path,
    *,
    clients: int,
    fit_metrics: Callable[[int, Metrics], Metrics] = as_reported,
    evaluate_metrics: Callable[[int, Metrics], Metrics] = as_reported,
) -> list[dict[str, Any]]:
    """The rows of one fit and one evaluation round served to ``clients`` reporting clients;
    each row's notes are printed as ``shoal coordinator serve`` prints them."""
    config = parse_config(
        network_job(
            tmp_path,
            run_id="outputs",
            token=TOKEN,
            clients=clients,
            per_round=clients,
            run={"name": "outputs", "rounds": 1},
            # every client in the cohort: at the default quorum a round starts once 4 of 5
            # have enrolled, and a slow fifth joined none of the rounds
            round={"deadline_s": 60.0, "quorum": 1.0},
            evaluation={"every": 1, "clients": clients},
        )
    )
    indices = itertools.count()
    rows: list[dict[str, Any]] = []

    def on_round(row: dict[str, Any]) -> None:
        round_notes(row)
        rows.append(row)

    def wrap(inner: Client) -> Client:
        return Reporting(
            inner, next(indices), fit_metrics=fit_metrics, evaluate_metrics=evaluate_metrics
        )

    asyncio.run(
        serve_to_digits_clients(
            tmp_path, config, clients=clients, token=TOKEN, on_round=on_round, wrap=wrap
        )
    )
    return rows


def by_phase(rows: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    (row,) = (row for row in rows if row["phase"] == phase)
    return row


# --- names the run reads back ------------------------------------------------------------------

FIT_IMPOSTORS = {"clustered_split": 1.0, "model_step_l2": 1e9}
EVALUATE_IMPOSTORS = {"playbook": 1.0}


def test_a_metric_named_after_a_field_the_run_reads_back_breaks_nothing(tmp_path: Path) -> None:
    rows = serve_reporting(
        tmp_path,
        clients=2,
        fit_metrics=lambda index, metrics: {**metrics, **FIT_IMPOSTORS, "app_f1": 0.5},
        evaluate_metrics=lambda index, metrics: {**metrics, **EVALUATE_IMPOSTORS},
    )
    fit, evaluate = by_phase(rows, "fit"), by_phase(rows, "evaluate")
    assert "clustered_split" not in fit  # the model did not split
    assert fit["model_step_l2"] != FIT_IMPOSTORS["model_step_l2"]  # the run's own
    assert fit["app_f1"] == pytest.approx(0.5)  # an app's metric still counts
    assert evaluate.get("playbook") != 1.0
    summary = json.loads((tmp_path / "state" / SUMMARY_FILE).read_text())
    assert summary["rounds_completed"] == 1
    assert all(is_run_figure(name) for name in (*FIT_IMPOSTORS, *EVALUATE_IMPOSTORS))


# --- as many names as a cohort can invent ------------------------------------------------------


def invented(index: int, metrics: Metrics) -> Metrics:
    """The client's own metrics, then as many of its own invention as a result may carry
    (the runtime adds the training time)."""
    room = MAX_METRICS - len(metrics) - 1
    return {**metrics, **{f"client{index}-metric{k}": float(k) for k in range(room)}}


def test_a_cohort_inventing_metric_names_fills_no_row_past_the_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clients = MAX_ROUND_METRIC_NAMES // MAX_METRICS + 1  # together, past the bound
    with caplog.at_level(logging.WARNING, logger="shoal.coordinator"):
        rows = serve_reporting(tmp_path, clients=clients, fit_metrics=invented)
    fit = by_phase(rows, "fit")
    names = [name for name in fit if not is_run_figure(name) and name not in ALWAYS_BOOKED]
    assert len(names) == MAX_ROUND_METRIC_NAMES  # the app's "steps", then invented ones
    assert fit["reported"] == clients and fit["committed"]  # every update counted
    assert fit["accuracy"] is not None and fit["loss"] is not None
    assert len(tracked_metrics(fit)) < 2 * MAX_ROUND_METRIC_NAMES  # one MLflow step
    stored = (tmp_path / "state" / METRICS_FILE).read_text()
    assert len(json.loads(stored.splitlines()[0])) == len(fit)
    warnings = [r for r in caplog.records if "metric names of its clients" in r.getMessage()]
    assert len(warnings) == 1  # once for the round, not once per result


def engine(*, clients: int) -> Coordinator:
    return Coordinator(
        settings=RoundSettings(clients_per_round=clients, quorum=1.0, deadline_s=100.0),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(2)]),
        seed=3,
    )


def test_past_the_bound_the_names_the_round_reads_and_those_it_holds_still_count() -> None:
    coordinator = engine(clients=3)
    actions = coordinator.handle(StartRound(1, Phase.FIT, 0.0, ("a", "b", "c", "d")))
    cohort = sorted(action.client_id for action in actions if isinstance(action, SendFitTask))
    filling = {f"name{k}": 1.0 for k in range(MAX_ROUND_METRIC_NAMES)}
    late = {"name0": 3.0, "loss": 2.0, "accuracy": 0.5, "late": 1.0}
    closing: list[object] = []
    for client, metrics in zip(cohort, (filling, late, {}), strict=False):  # {}: none at all
        update = UpdateReceived(client, 1, 1.0, np.ones(2, np.float32), 10, metrics)
        closing = coordinator.handle(update)
    (closed,) = (action for action in closing if isinstance(action, RoundClosed))
    summary = closed.summary
    assert summary.committed and summary.reported == 3
    assert "late" not in summary.metrics
    assert len(summary.metrics.keys() - ALWAYS_BOOKED) == MAX_ROUND_METRIC_NAMES
    # each over the results that reported it: the one without metrics pulls none towards 0
    assert summary.metrics["name0"] == pytest.approx((10 * 1.0 + 10 * 3.0) / 20)
    assert summary.metrics["loss"] == pytest.approx(2.0)


def test_the_names_left_out_are_those_past_the_room_left() -> None:
    assert metric_names_left_out({}, {}) == []
    assert metric_names_left_out({"f1": 1.0}, {}, limit=0) == ["f1"]
    assert metric_names_left_out({"f1": 1.0, "loss": 1.0}, {"f1": 2.0}, limit=0) == []
    booked = {"loss": 1.0, "accuracy": 1.0, "a": 1.0}  # the round's own names take no room
    assert metric_names_left_out({"b": 1.0, "c": 1.0}, booked, limit=2) == ["c"]


# --- numbers no figure can hold ----------------------------------------------------------------


@pytest.mark.parametrize("accuracy", [math.nan, math.inf])
def test_a_non_finite_accuracy_leaves_its_device_class_its_accuracy(
    tmp_path: Path, accuracy: float
) -> None:
    def reported(index: int, metrics: Metrics) -> Metrics:
        return {**metrics, "accuracy": accuracy} if index == 0 else metrics

    rows = serve_reporting(tmp_path, clients=2, evaluate_metrics=reported)
    evaluate = by_phase(rows, "evaluate")
    (device_class,) = evaluate["fairness"].values()  # both clients are "server"
    assert device_class["accuracy"] is not None and math.isfinite(device_class["accuracy"])
    stored = (tmp_path / "state" / METRICS_FILE).read_text()
    for line in stored.splitlines():  # strict JSON: NaN and infinity are refused
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {METRICS_FILE}"))


def test_the_clients_training_accuracy_is_not_drawn_as_the_central_tests(tmp_path: Path) -> None:
    """A fit row's ``accuracy`` is the clients' mean where the server app evaluates nothing
    (a client chooses it); the report drew it as the "central test" line all the same."""
    rows = [
        {"round": 1, "phase": "fit", "accuracy": 0.99, "loss": 0.1},  # no test_accuracy
        {"round": 2, "phase": "fit", "accuracy": 0.5, "test_accuracy": 0.5, "loss": 0.1},
    ]
    run = RunData(name="run", folder=tmp_path, rows=tuple(rows), summary={}, drift=())
    (accuracy,) = (figure for figure in figures([run]) if figure.key == "accuracy-round")
    svg = ET.fromstring(accuracy.svg)
    (central,) = (
        line for line in svg.iter("g") if line.findtext("polyline/title") == "central test"
    )
    tooltips = [circle.findtext("title", "") for circle in central.iter("circle")]
    assert tooltips == ["central test: round 2, 0.5"]
