"""What a closed round's books say: its summary for the shell, its divergence and its drift.

Pure functions of the round engine's books (:class:`~shoal.coordinator.rounds.RoundBooks`):
the engine (:class:`~shoal.coordinator.engine.Coordinator`) calls them when it closes a
round, so that its state machine holds the transitions and these hold the arithmetic.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import numpy.typing as npt

from shoal.aggregation.divergence import DivergenceReport, DivergenceRule, measure_divergence
from shoal.aggregation.drift import DriftReport, DriftRule, drift_later, sent_together
from shoal.aggregation.measures import measures_later
from shoal.coordinator.app import ClientMetrics, MetricsAggregation
from shoal.coordinator.events import ClusterReport, FleetReport, RoundSummary
from shoal.coordinator.homomorphic import CkksRound
from shoal.coordinator.rounds import RoundBooks, metric_means
from shoal.core.later import Later, Offload, Ready, at_once, here
from shoal.core.parameters import Vector

log = logging.getLogger("shoal.coordinator")
Counted = tuple[list[str], npt.NDArray[np.float32]]
"""The counted clients and their updates, one row each."""

MAX_FAILURE_REASONS = 5
"""The most frequent failure reasons a round's summary keeps."""


def summarize(
    current: RoundBooks,
    *,
    now: float,
    committed: bool,
    abort_reason: str | None = None,
    aggregate: MetricsAggregation | None = None,
    deadline_s: float = math.inf,
) -> RoundSummary:
    """The summary of a round closed at ``now``; ``aggregate``: the app's aggregation of
    the clients' metrics for the round's phase (None: the example-weighted means only);
    ``deadline_s``: a round's deadline (a secure round's, per stage)."""
    weight = current.num_examples
    metrics = metric_means(current.metric_sums, current.metric_weights, weight)
    if aggregate is not None and current.client_metrics:
        metrics = {**metrics, **app_metrics(aggregate, current.client_metrics)}
    return RoundSummary(
        round=current.number,
        phase=current.phase,
        started_at=current.started_at,
        closed_at=now,
        selected=len(current.cohort),
        reported=len(current.reported),
        failed=len(current.failed),
        outstanding=len(current.cohort) - current.accounted,
        rejected=dict(sorted(current.rejected.items())),
        num_examples=weight,
        loss=metrics.get("loss"),
        metrics=metrics,
        committed=committed,
        abort_reason=abort_reason,
        secure=current.secure_report,
        participants=tuple(sorted(current.reported)),
        failures=dict(current.failures.most_common(MAX_FAILURE_REASONS)),
        policy_decisions=current.policy_decisions,
        policy_denied=dict(sorted(current.policy_denied.items())),
        fallback=None if current.fallback is None else current.fallback.report(),
        divergence=None if current.divergence is None else at_once(current.divergence),
        drift=None if current.drift is None else at_once(current.drift),
        clusters={
            cluster: ClusterReport(books.clients, books.num_examples, books.means())
            for cluster, books in sorted(current.clusters.items())
        },
        cohort=tuple(sorted(current.cohort)),
        fleet=fleet_report(current, now=now, committed=committed, deadline_s=deadline_s),
        split=current.split,
        upload_bytes=current.upload_bytes,
    )


def fleet_report(
    current: RoundBooks, *, now: float, committed: bool, deadline_s: float
) -> FleetReport | None:
    """The round's timings and drops (None: ``[telemetry]`` is off). An asked client that
    neither counted nor failed dropped at the ``deadline`` (a secure round's stages time out),
    as ``surplus`` of a round that committed before it, or when its round ``aborted``."""
    if current.fleet is None:
        return None
    deadline_at = current.deadline_at
    if current.secure is not None or (deadline_at is not None and now >= deadline_at):
        remainder = "deadline"
    else:
        remainder = "surplus" if committed else "aborted"
    return current.fleet.report(
        reported=current.reported,
        unaccounted=len(current.cohort) - len(current.reported) - sum(current.fleet.drops.values()),
        remainder=remainder,
        deadline_at=deadline_at,
        deadline_s=deadline_s,
    )


def app_metrics(aggregate: MetricsAggregation, results: ClientMetrics) -> dict[str, float]:
    """The app's aggregation of the clients' metrics; its failure costs the metrics only."""
    try:
        combined = aggregate(results)
        return {str(name): float(value) for name, value in combined.items()}
    except Exception as exc:  # a user's function: the round stands without its metrics
        log.error("the app's metrics aggregation failed: %s", exc)
        return {}


def round_divergence(
    current: RoundBooks,
    aggregate: Vector,
    *,
    rule: DivergenceRule | None,
    seed: int,
    counted: Counted | None = None,
) -> DivergenceReport | None:
    """Each counted update against the round's aggregate and median (none under a secure
    round: no single update was ever seen, which the report says). ``seed``: the run's (the
    round's number is added); ``counted``: :func:`counted_updates`, if the caller has them."""
    if rule is None:
        return None
    protocol = _secure_protocol(current)
    if protocol is not None:
        return DivergenceReport.unavailable(
            f"per-client divergence cannot exist under {protocol}: only the sum is seen; "
            "detection watches the aggregate"
        )
    if not current.counted:
        return DivergenceReport()
    names, updates = counted or counted_updates(current)
    return measure_divergence(names, updates, aggregate, rule=rule, seed=seed + current.number)


def round_measures(
    current: RoundBooks,
    aggregate: Vector,
    *,
    divergence: DivergenceRule | None,
    drift: DriftRule | None,
    seed: int,
    counted: Counted | None = None,
    offload: Offload = here,
) -> tuple[Later[DivergenceReport] | None, Later[DriftReport] | None]:
    """The round's divergence and drift (:func:`round_divergence`, :func:`round_drift`).
    Where both are on, the round's updates were seen in the clear, and they are few enough
    to send (:func:`~shoal.aggregation.drift.sent_together`), both are one task of
    ``offload``'s, the updates sent once."""
    plain = bool(current.counted) and _secure_protocol(current) is None
    if divergence is not None and drift is not None and plain:
        names, updates = counted or counted_updates(current)
        if sent_together(updates):
            return measures_later(
                names,
                updates,
                aggregate,
                divergence=divergence,
                drift=drift,
                seed=seed + current.number,
                offload=offload,
            )
    report = round_divergence(current, aggregate, rule=divergence, seed=seed, counted=counted)
    return (
        None if report is None else Ready(report),
        round_drift(current, rule=drift, seed=seed, counted=counted, offload=offload),
    )


def round_drift(
    current: RoundBooks,
    *,
    rule: DriftRule | None,
    seed: int,
    counted: Counted | None = None,
    offload: Offload = here,
) -> Later[DriftReport] | None:
    """The projection and clustering of the counted updates (none under a secure round, which
    the report says), their work past the updates' Gram matrix ``offload``'s
    (:func:`~shoal.aggregation.drift.drift_later`). ``seed``: the run's (the round's number
    is added); ``counted``: :func:`counted_updates`, if the caller has them."""
    if rule is None:
        return None
    protocol = _secure_protocol(current)
    if protocol is not None:
        return Ready(
            DriftReport.unavailable(
                f"the drift of single updates cannot be seen under {protocol}: only the sum is"
            )
        )
    names, updates = counted or counted_updates(current)
    return drift_later(names, updates, rule=rule, seed=seed + current.number, offload=offload)


def _secure_protocol(current: RoundBooks) -> str | None:
    """The secure protocol that hides the round's single updates (None: a plaintext round)."""
    if current.secure is None:
        return None
    return "CKKS" if isinstance(current.secure, CkksRound) else "SecAgg+"


def counted_updates(current: RoundBooks) -> Counted:
    """The counted clients and their updates, one row each (an empty matrix: none)."""
    names = [client for client, _ in current.counted]
    if not names:
        return names, np.zeros((0, 0), np.float32)
    return names, np.stack([update for _, update in current.counted])
