"""A metrics row as flat, MLflow-legal metric names: nested figures joined by dots.

>>> flatten_metrics({"loss": 0.5, "fairness": {"day": {"accuracy": 0.9}}, "phase": "fit"})
{'loss': 0.5, 'fairness.day.accuracy': 0.9}

Every number of a row is a metric, however deep: a nested mapping's keys
join its name with dots (``drops_by_reason.deadline``,
``divergence.l2_to_aggregate.p90``). Booleans count as 0 and 1; None,
text and lists are left out; NaN stays NaN, so a diverged loss shows. A new
field of the row needs no change here.

Names are the same on every platform and every MLflow version: each part
keeps ASCII letters, digits, ``_`` and ``-``, and any other character
(a dot inside a key, a colon, a space, a slash) becomes ``_``, so
``drops_by_reason`` ``failed:ValueError`` is
``drops_by_reason.failed_ValueError``. Two keys of one mapping that this
would merge get a short hash of the original key, and a name longer
than MLflow's 250 characters is cut and ends in a hash of itself: no
figure overwrites another.

:func:`is_run_figure` tells the names of the row's own figures (what the
run's telemetry writes, some only in some runs: ``epsilon`` with privacy,
``drift_*`` with drift) from the clients' metrics, which the row takes by
name: a client's metric under such a name is left out of the row, so that
the dashboard, Prometheus and the report never read it as the run's own.
"""

from __future__ import annotations

import hashlib
import numbers
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

_PERCENTILES = (("rtt", "_s"), ("train", "_s"), ("deadline_share", ""))
MAX_NAME_CHARS = 250  # MLflow's limit on a metric's name
RUN_FIGURES = frozenset(
    {
        *("round", "phase", "committed", "abort_reason", "model_version", "sha256"),
        *("selected", "reported", "dropped", "rejected", "excluded", "examined", "failures"),
        *("num_examples", "virtual_time_s", "wall_time_s", "fallback", "recovered"),
        *("bytes_up", "bytes_down", "bytes_up_per_client", "bytes_down_per_client"),
        *("drop_rate", "drops_by_stage", "drops_by_reason", "straggler_index"),
        *(f"{name}_p{q}{unit}" for q in (50, 90, 99) for name, unit in _PERCENTILES),
        *("fairness", "fairness_gap", "participation_gap", "battery_drain"),
        *("epsilon", "delta", "noise_multiplier", "clip_norm", "next_clip_norm"),
        *("population", "sampling_rate", "cluster_sizes", "cluster_accuracy", "cluster_loss"),
        # read back as the run's own: a client's number there broke the run's summary (a
        # playbook verdict) and the coordinator's round notes (a split)
        *("playbook", "clustered_split", "model_step_l2"),
    }
)
"""The names of a row's own figures (see :func:`is_run_figure`)."""
RUN_FIGURE_PREFIXES = ("divergence", "drift_", "secure_", "policy_", "privacy_", "canary_", "test_")
HASH_CHARS = 6
_ILLEGAL = re.compile(r"[^A-Za-z0-9_\-]")


def flatten_metrics(values: Mapping[Any, Any], *, prefix: str = "") -> dict[str, float]:
    """Every number in ``values``, nested ones included, under its flat name (see the module)."""
    flat: dict[str, float] = {}
    for key, part in _parts(values):
        value = values[key]
        name = _fit(prefix + part)
        if isinstance(value, Mapping):
            flat |= flatten_metrics(value, prefix=f"{name}.")
        elif (number := as_metric(value)) is not None:
            flat[name] = number
    return flat


def is_run_figure(name: str) -> bool:
    """Whether ``name`` is one of a row's own figures, not a name a client's metric may take.

    >>> is_run_figure("epsilon"), is_run_figure("drift_bimodal"), is_run_figure("f1")
    (True, True, False)
    """
    return name in RUN_FIGURES or name.startswith(RUN_FIGURE_PREFIXES)


def as_metric(value: object) -> float | None:
    """A value as a metric: a boolean as 0 or 1, a real number as a float, anything else None."""
    if isinstance(value, bool | np.bool_):
        return float(bool(value))
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def name_part(key: object) -> str:
    """One part of a metric name: the key with every character MLflow may refuse as ``_``.

    >>> name_part("failed:ValueError"), name_part("day.v2"), name_part("")
    ('failed_ValueError', 'day_v2', '_')
    """
    return _ILLEGAL.sub("_", str(key)) or "_"


def _parts(values: Mapping[Any, Any]) -> Iterator[tuple[Any, str]]:
    """Each key with its name part; a part that two keys share is suffixed by the key's hash,
    except for the key that is that part already."""
    parts = {key: name_part(key) for key in values}
    shared: dict[str, int] = {}
    for part in parts.values():
        shared[part] = shared.get(part, 0) + 1
    for key, part in parts.items():
        if shared[part] > 1 and str(key) != part:
            part = f"{part}-{_hash(key)}"
        yield key, part


def _fit(name: str) -> str:
    """``name``, or its head and its hash when it is longer than MLflow allows."""
    if len(name) <= MAX_NAME_CHARS:
        return name
    return f"{name[: MAX_NAME_CHARS - HASH_CHARS - 1]}-{_hash(name)}"


def _hash(key: object) -> str:
    return hashlib.sha256(str(key).encode()).hexdigest()[:HASH_CHARS]
