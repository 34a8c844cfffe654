"""A run's metrics: a closed round's row, the central evaluation, and the run's summary.

The row of a round counts who was selected, reported, dropped, rejected
and excluded, with the round's loss, accuracy, bytes and virtual time, the
fallback it took, its secure-aggregation outcome, its divergence and drift, the
policy's decisions and its privacy accounting; stored telemetry names the
round's clients only under their round's pseudonyms (``[metadata]``). The
server app's evaluation of a new model adds ``test_*`` columns. The summary
(the run-output contract of DESIGN.md) is the run's totals and its final
model, HEAD (not a later round's that was rolled back).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shoal.aggregation.divergence import DivergenceRule
from shoal.aggregation.drift import DriftRule
from shoal.config import Config
from shoal.coordinator.app import ServerApp
from shoal.coordinator.events import RoundSummary
from shoal.coordinator.playbook import rolled_back, tally
from shoal.coordinator.records import RunStore
from shoal.coordinator.telemetry import DeviceClasses, fleet_fields
from shoal.core.clusters import split_models
from shoal.core.parameters import Parameters
from shoal.governance.pseudonyms import Names, PlainNames, pseudonymize
from shoal.privacy.run import RunPrivacy
from shoal.registry import ModelRecord
from shoal.tasks import Phase
from shoal.telemetry.fleet import summary_fields as fleet_summary
from shoal.telemetry.metric_names import is_run_figure

log = logging.getLogger("shoal.run")

Row = dict[str, Any]
# a row's fields whose words are Shoal's own (a client that calls itself "fit" changes none)
# row keys kept as they are: no client in them, or (``battery_drain``) the simulator's own state
# of its simulated devices, which a resumed simulation replays by device name
_NAMES_NO_CLIENT = frozenset(
    {"phase", "secure_aggregation", "sha256", "model_version", "battery_drain"}
)
_NO_TEXT = (int, float, type(None))  # a value of these types names nobody (bool is an int)
EVALUATION_UPLOAD_BYTES = 256
"""What one client's evaluation answer weighs on the wire, about."""


def round_row(
    summary: RoundSummary,
    extra: Mapping[str, Any],
    *,
    names: Names,
    model_bytes: int,
    excluded_criteria: Sequence[str],
    screened: Row | None,
    policy: bool,
    privacy: RunPrivacy | None,
    classes: DeviceClasses,
) -> Row:
    """The metrics row of a closed round, as stored telemetry keeps it.

    ``extra`` holds what only the shell knows; it overrides the defaults.
    ``screened``: the counts of the play's last screening; ``policy``: the
    run has a ``[policy]``, whose decisions a fit row counts; ``classes``: the population's
    device classes, for the fleet fields (:mod:`shoal.coordinator.telemetry`).
    """
    fit = summary.phase is Phase.FIT
    row: Row = {
        "round": summary.round,
        "phase": summary.phase.value,
        "selected": summary.selected,
        "reported": summary.reported,
        "dropped": summary.failed + summary.outstanding,
        "rejected": dict(summary.rejected),
        "excluded": {
            criterion: summary.excluded.get(criterion, 0) for criterion in excluded_criteria
        },
        "failures": dict(summary.failures),
        "committed": summary.committed,
        "abort_reason": summary.abort_reason,
        "num_examples": summary.num_examples,
        "loss": summary.loss,
        "accuracy": summary.metrics.get("accuracy"),
        "virtual_time_s": summary.closed_at,
        "model_version": None,
        "bytes_down": model_bytes * summary.selected,
        "bytes_up": summary.upload_bytes
        if fit and summary.upload_bytes is not None
        else summary.reported * (model_bytes if fit else EVALUATION_UPLOAD_BYTES),
    }
    if screened is not None:
        row.update(screened)
    if summary.fallback is not None:
        row["fallback"] = summary.fallback.fields()
    row.update(_secure_fields(summary, names=names))
    row.update(extra)
    row.update(clients_metrics(summary, row))
    row.update(fleet_fields(summary, row, classes=classes))
    divergence = summary.divergence_report() if fit else None  # waited for, as the drift
    if divergence is not None:
        row.update(divergence.row_fields())
    drift = summary.drift_report() if fit else None  # waited for, if measured elsewhere
    if drift is not None:
        row.update(drift.row_fields())
    if summary.clusters:
        row.update(cluster_fields(summary))
    if summary.split is not None:
        row["clustered_split"] = summary.split.row_field()
    if fit and policy:
        row.update(
            policy_decisions=summary.policy_decisions,
            policy_denied=dict(summary.policy_denied),
        )
    if fit and privacy is not None:
        row.update(privacy.row_fields(summary))
    return pseudonymous(row, summary, names=names)


def clients_metrics(summary: RoundSummary, row: Row) -> Row:
    """The clients' own metrics the row takes by name: not one it holds, nor one named after
    the run's own figures (:func:`~shoal.telemetry.metric_names.is_run_figure`), which a
    client would fill in a run that does not measure it (``epsilon`` without privacy); one
    warning names those left out."""
    new = [name for name in summary.metrics if name not in row]
    taken = sorted(name for name in new if is_run_figure(name))
    if taken:
        log.warning(
            "round %d: the clients' metrics %s are left out of its row: "
            "those are names of the run's own figures",
            summary.round,
            ", ".join(repr(name) for name in taken),
        )
    return {name: summary.metrics[name] for name in new if not is_run_figure(name)}


def _secure_fields(summary: RoundSummary, *, names: Names) -> Row:
    """A secure round's outcome, its culprits under their round's pseudonyms (``{}``: none)."""
    report = summary.secure
    if report is None:
        return {}
    return {
        "secure_aggregation": report.protocol,
        "secure_dropped": dict(report.dropped),
        "recovered": report.recovered,
        "secure_aborted": report.aborted,
        "secure_culprits": sorted(
            names.of(client, round_number=summary.round) for client in report.culprits
        ),
    }


def pseudonymous(row: Row, summary: RoundSummary, *, names: Names) -> Row:
    """The row as stored telemetry keeps it: an id of the round's clients anywhere in it (a
    failure or an abort reason that names one) under its round's pseudonym."""
    if isinstance(names, PlainNames):
        return row
    culprits = () if summary.secure is None else tuple(summary.secure.culprits)
    clients = frozenset({*summary.cohort, *summary.participants, *culprits})  # one for all keys
    return {
        key: value
        if key in _NAMES_NO_CLIENT or isinstance(value, _NO_TEXT)
        else pseudonymize(value, names=names, clients=clients, round_number=summary.round)
        for key, value in row.items()
    }


def cluster_fields(summary: RoundSummary) -> Row:
    """A clustered round's clusters: a fit row's ``cluster_sizes`` (clients that trained each
    cluster model), an evaluation row's ``cluster_accuracy`` and ``cluster_loss`` (of the
    clients that each cluster model served best), keyed by the cluster's index."""
    clusters = summary.clusters.items()
    if summary.phase is Phase.FIT:
        return {"cluster_sizes": {str(c): report.clients for c, report in clusters}}
    return {
        f"cluster_{name}": {str(c): report.metrics.get(name) for c, report in clusters}
        for name in ("accuracy", "loss")
    }


def central_evaluation(
    app: ServerApp, parameters: Parameters, *, round_number: int, clusters: int = 1
) -> Row:
    """The server app's evaluation of a new model, as ``test_*`` columns; a clustered model's
    (``clusters`` above 1) is each cluster model's, as ``test_cluster_<name>`` by cluster."""
    if app.evaluate is None:
        return {}
    models = [parameters] if clusters == 1 else split_models(parameters, clusters=clusters)
    try:
        scores = [dict(app.evaluate(model, round_number)) for model in models]
    except Exception as exc:  # a user's function: the round stands without test metrics
        log.error("the server app's evaluate failed in round %d: %s", round_number, exc)
        return {}
    if clusters > 1:
        names = sorted({name for score in scores for name in score})
        return {
            f"test_cluster_{name}": {str(c): score.get(name) for c, score in enumerate(scores)}
            for name in names
        }
    (metrics,) = scores
    columns: Row = {f"test_{name}": value for name, value in metrics.items()}
    if "accuracy" in metrics:
        columns["accuracy"] = metrics["accuracy"]
    return columns


def run_summary(
    store: RunStore,
    *,
    config: Config,
    architecture: str,
    num_parameters: int,
    privacy: RunPrivacy | None,
    stop_reason: str | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's summary (the run-output contract), written to the store; the audit log's
    head is signed first, so that the summary names the run's last entry."""
    rows = store.rows()
    fits = [row for row in rows if row["phase"] == "fit"]
    committed = [row for row in fits if row.get("committed")]
    head = store.head()
    last = _head_row(committed, head)
    evaluations = [
        row
        for row in rows
        if row["phase"] == "evaluate" and row.get("committed") and not rolled_back(row)
    ]
    final_accuracy = last.get("test_accuracy")
    if final_accuracy is None and evaluations:
        final_accuracy = evaluations[-1].get("accuracy")
    head = store.head()
    audit_head = store.sign_audit_head()  # the run's last entries, signed at its end
    summary: dict[str, Any] = {
        "rounds_completed": len(committed),
        "rounds_aborted": len(fits) - len(committed),
        "final_accuracy": final_accuracy,
        "final_loss": last.get("loss"),
        "final_test_loss": last.get("test_loss"),
        "final_federated_accuracy": evaluations[-1].get("accuracy") if evaluations else None,
        "wall_time_s": max((row.get("wall_time_s", 0.0) for row in rows), default=0.0),
        "virtual_time_s": rows[-1].get("virtual_time_s", 0.0) if rows else 0.0,
        "num_parameters": num_parameters,
        "bytes_up": sum(row.get("bytes_up", 0) for row in rows),
        "bytes_down": sum(row.get("bytes_down", 0) for row in rows),
        "model_version": None if head is None else head.version,
        "model_sha256": None if head is None else head.sha256,
        "architecture": architecture,
        "strategy": config.strategy.name,
        "secure_aggregation": config.secure_aggregation.protocol,
        "rounds_aborted_below_threshold": sum(1 for row in fits if row.get("secure_aborted")),
        "clients_recovered": sum(row.get("recovered", 0) for row in fits),
        "fallbacks": _fallbacks(rows),
        "audit_seq": None if audit_head is None else audit_head.seq,
        "audit_hash": None if audit_head is None else audit_head.hash,
        **({"playbook": tally(rows)} if config.playbook.enabled else {}),
        "stop_reason": stop_reason,
        **({} if privacy is None else privacy.summary_fields()),
        **(fleet_summary(rows) if config.telemetry.enabled else {}),
        **(extra or {}),
        "seed": config.run.seed,
    }
    store.write_summary(summary)
    return summary


def why_aborted(rows: Iterable[Row]) -> str:
    """Why fit ``rows`` committed nothing, in one line: their most frequent abort reasons, then
    what the clients raised or, if none raised, why they dropped."""
    fits = [row for row in rows if row.get("phase") == "fit"]
    reasons = Counter(str(row["abort_reason"]) for row in fits if row.get("abort_reason"))
    failures: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    for row in fits:
        failures.update(row.get("failures") or {})
        drops.update(row.get("drops_by_reason") or {})
    why = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(2))
    raised = "; ".join(f"{count} x {failure}" for failure, count in failures.most_common(2))
    dropped = ", ".join(f"{count} x {reason}" for reason, count in drops.most_common(3))
    return (
        (why or "see metrics.jsonl")
        + (f"; clients failed: {raised}" if raised else "")
        + (f"; clients dropped: {dropped}" if dropped and not raised else "")
    )


def divergence_rule(config: Config) -> DivergenceRule | None:
    """The job's ``[divergence]`` rule; None when it is off."""
    section = config.divergence
    if not section.enabled:
        return None
    return DivergenceRule(
        max_z=section.max_z, min_cosine=section.min_cosine, min_clients=section.min_clients
    )


def drift_rule(config: Config) -> DriftRule | None:
    """The job's ``[drift]`` rule; None when it is off."""
    section = config.drift
    if not section.enabled:
        return None
    return DriftRule(
        method=section.method,
        max_clusters=section.max_clusters,
        bimodal_threshold=section.bimodal_threshold,
    )


def drift_projection(summary: RoundSummary, *, names: Names) -> str | None:
    """A fit round's record for ``drift.jsonl`` (one line of JSON), its clients under their
    round's pseudonyms (None: no projection in the round)."""
    drift = summary.drift_report()
    if drift is None or not drift.available or not drift.clients:
        return None
    named = [names.of(client, round_number=summary.round) for client in drift.clients]
    return drift.record_line(summary.round, named)


def _head_row(committed: list[Row], head: ModelRecord | None) -> Row:
    """The fit row of the final model, HEAD (not a later round's that was rolled back)."""
    if head is not None:
        for row in reversed(committed):
            if row.get("model_version") == head.version:
                return row
    kept = [row for row in committed if not rolled_back(row)]
    return kept[-1] if kept else {}


def _fallbacks(rows: Iterable[Row]) -> dict[str, int]:
    """How many rounds took each fallback, by kind (``{}``: none did)."""
    taken = Counter(row["fallback"]["kind"] for row in rows if row.get("fallback"))
    return dict(sorted(taken.items()))
