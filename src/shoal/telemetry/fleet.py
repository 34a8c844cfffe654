"""Fleet telemetry of one round: drops, stragglers, cohort fairness and bandwidth, as row fields.

Pure functions over the round's values (numpy's percentiles, over a sorted
list); the run layer (:mod:`shoal.coordinator.run_metrics`) calls them
with what the round engine booked, so the simulator and a deployed
coordinator write the very same fields:

- ``drop_rate`` (asked but not reported, over asked), ``drops_by_stage``
  and ``drops_by_reason``;
- ``rtt_p50_s`` ... ``rtt_p99_s`` (task sent to result received),
  ``train_p50_s`` ... (the client's own training or evaluation time),
  ``deadline_share_p50`` ... (round trip over the time the client had until
  the deadline) and ``straggler_index`` (the p90 share);
- ``fairness`` by device class (population share, participation share,
  federated-evaluation accuracy), ``fairness_gap`` and ``participation_gap``;
- ``bytes_up_per_client`` and ``bytes_down_per_client``.

>>> timing_fields(np.array([1.0, 2.0]), np.array([]), np.array([10.0, 10.0]))["rtt_p50_s"]
1.5
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.core.quantiles import quantile_of_sorted

Floats = npt.NDArray[np.float64]
Fields = dict[str, Any]

UNKNOWN_CLASS = "unknown"
"""The device class of a client whose class nobody reported."""
PERCENTILES = (50, 90, 99)


def percentile_fields(prefix: str, values: Iterable[float], *, suffix: str = "") -> Fields:
    """``{prefix}_p50{suffix}``, ``_p90`` and ``_p99`` of the finite ``values`` (None each
    when there are none): ``numpy.percentile``'s floats, over a sorted list
    (:mod:`shoal.core.quantiles`)."""
    names = _percentile_names(prefix, suffix)
    given = list(values)
    # a finite sum holds no NaN or infinity: the values sort as they are (else, or where the
    # sum overflows, the non-finite ones are left out first)
    finite = sorted(given if math.isfinite(sum(given)) else filter(math.isfinite, given))
    if not finite:
        return dict.fromkeys(names)
    return {name: quantile_of_sorted(finite, q) for name, q in zip(names, _QUANTILES, strict=True)}


_QUANTILES = tuple(q / 100 for q in PERCENTILES)


@functools.cache
def _percentile_names(prefix: str, suffix: str) -> tuple[str, ...]:
    """The fields' names, made once per kind (each round asks for the same few)."""
    return tuple(f"{prefix}_p{q}{suffix}" for q in PERCENTILES)


def timing_fields(
    round_trips: Sequence[float], training: Iterable[float], windows: Sequence[float]
) -> Fields:
    """Round-trip, training and deadline-share percentiles, and the straggler index.

    ``round_trips`` and ``windows`` pair up per answering client (``windows``:
    the seconds it had from its task to the deadline); ``training`` holds the
    training times the clients reported (any number of them).
    """
    shares = [
        trip / span if span > 0 else math.nan
        for trip, span in zip(round_trips, windows, strict=True)
    ]
    fields = {
        **percentile_fields("rtt", round_trips, suffix="_s"),
        **percentile_fields("train", training, suffix="_s"),
        **percentile_fields("deadline_share", shares),
    }
    fields["straggler_index"] = fields["deadline_share_p90"]
    return fields


def drop_fields(
    *,
    selected: int,
    reported: int,
    by_stage: Mapping[str, int],
    by_reason: Mapping[str, int],
) -> Fields:
    """The drop rate (None when nobody was asked) and the drops by stage and by reason."""
    return {
        "drop_rate": (selected - reported) / selected if selected else None,
        "drops_by_stage": {stage: count for stage, count in sorted(by_stage.items()) if count},
        "drops_by_reason": {reason: count for reason, count in sorted(by_reason.items()) if count},
    }


def fairness_fields(
    population: Mapping[str, float],
    participants: Sequence[str],
    accuracy: Mapping[str, tuple[float, float]] | None = None,
) -> Fields:
    """Cohort fairness by device class.

    ``population``: each class's share of the population; ``participants``:
    the class of each client whose result counted; ``accuracy``: each
    class's (examples, example-weighted accuracy sum) from a federated
    evaluation (None: a fit round, whose entries hold accuracy None).
    ``fairness_gap`` is the mean of the classes' accuracies minus the worst
    one's (None under two classes with an accuracy); ``participation_gap``
    the largest gap between a class's participation and population shares.
    """
    counts = Counter(participants)
    total = len(participants)
    classes = sorted({*population, *counts, *(accuracy or {})})
    per_class: dict[str, dict[str, float | None]] = {}
    for name in classes:
        examples, weighted = (accuracy or {}).get(name, (0.0, 0.0))
        per_class[name] = {
            "population_share": float(population.get(name, 0.0)),
            "participation_share": counts[name] / total if total else 0.0,
            "accuracy": weighted / examples if examples > 0 else None,
        }
    accuracies = [entry["accuracy"] for entry in per_class.values()]
    known = [value for value in accuracies if value is not None]
    gaps = [
        abs(float(entry["participation_share"] or 0.0) - float(entry["population_share"] or 0.0))
        for entry in per_class.values()
    ]
    return {
        "fairness": per_class,
        "fairness_gap": float(np.mean(known) - min(known)) if len(known) >= 2 else None,
        "participation_gap": max(gaps) if total and gaps else None,
    }


def class_accuracy(
    classes: Sequence[str], examples: Floats, accuracies: Floats
) -> dict[str, tuple[float, float]]:
    """Per class, the examples and the example-weighted accuracy sum of its evaluations
    (``classes``, ``examples`` and ``accuracies`` pair up per client)."""
    if not classes:
        return {}
    names, codes = np.unique(np.asarray(classes), return_inverse=True)
    weights = np.bincount(codes, weights=examples, minlength=len(names))
    sums = np.bincount(codes, weights=examples * accuracies, minlength=len(names))
    return {
        str(name): (float(weight), float(total))
        for name, weight, total in zip(names, weights, sums, strict=True)
    }


def population_shares(classes: Iterable[str], counts: Iterable[float]) -> dict[str, float]:
    """Each class's share of a population counted by class (``{}``: nobody)."""
    tally: dict[str, float] = {}
    for name, count in zip(classes, counts, strict=True):
        tally[name] = tally.get(name, 0.0) + float(count)
    total = sum(tally.values())
    return {name: tally[name] / total for name in sorted(tally)} if total else {}


def bandwidth_fields(*, bytes_up: int, bytes_down: int, reported: int, selected: int) -> Fields:
    """The mean bytes per client: up over those who reported, down over those asked."""
    return {
        "bytes_up_per_client": bytes_up / reported if reported else None,
        "bytes_down_per_client": bytes_down / selected if selected else None,
    }


def summary_fields(rows: Sequence[Mapping[str, Any]]) -> Fields:
    """The run's fleet figures: the overall drop rate, the median straggler index, the last
    evaluation's fairness gap, bytes per client, and the rounds with a bimodal drift."""
    selected = sum(int(row.get("selected") or 0) for row in rows)
    reported = sum(int(row.get("reported") or 0) for row in rows)
    stragglers = [row["straggler_index"] for row in rows if row.get("straggler_index") is not None]
    evaluations = [row for row in rows if row.get("phase") == "evaluate" and "fairness" in row]
    return {
        "drop_rate": (selected - reported) / selected if selected else None,
        "straggler_index": float(np.median(stragglers)) if stragglers else None,
        "fairness_gap": evaluations[-1].get("fairness_gap") if evaluations else None,
        **bandwidth_fields(
            bytes_up=sum(int(row.get("bytes_up") or 0) for row in rows),
            bytes_down=sum(int(row.get("bytes_down") or 0) for row in rows),
            reported=reported,
            selected=selected,
        ),
        "drift_bimodal_rounds": sum(1 for row in rows if row.get("drift_bimodal")),
    }
