"""Flat MLflow metric names for a row: every number kept, every name legal, none overwritten."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from shoal.dashboard.page import EVALUATE_TILES, FIT_TILES
from shoal.telemetry import prometheus
from shoal.telemetry.metric_names import (
    MAX_NAME_CHARS,
    as_metric,
    flatten_metrics,
    is_run_figure,
    name_part,
)
from support.rows import contract_row

# what MLflow accepts on every platform (Windows refuses the colon), with no empty part
PORTABLE_NAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")


def test_nested_figures_are_joined_by_dots_and_only_numbers_are_kept() -> None:
    row = {
        "loss": 0.5,
        "committed": True,
        "divergence_flagged": False,
        "phase": "fit",
        "abort_reason": None,
        "playbook": {"reasons": ["norm"], "verdict": "good"},
        "fairness": {
            "phone": {"population_share": 0.5, "participation_share": 0.25, "accuracy": None},
            "gateway": {"population_share": 0.5, "participation_share": 0.75, "accuracy": 0.9},
        },
        "drops_by_reason": {"deadline": 2, "failed:ValueError": 1, "rejected:norm too big": 1},
        "cluster_accuracy": {"0": 0.8, "1": 0.7},
        "numpy": np.float32(0.25),
    }
    assert flatten_metrics(row) == {
        "loss": 0.5,
        "committed": 1.0,
        "divergence_flagged": 0.0,
        "fairness.phone.population_share": 0.5,
        "fairness.phone.participation_share": 0.25,
        "fairness.gateway.population_share": 0.5,
        "fairness.gateway.participation_share": 0.75,
        "fairness.gateway.accuracy": 0.9,
        "drops_by_reason.deadline": 2.0,
        "drops_by_reason.failed_ValueError": 1.0,
        "drops_by_reason.rejected_norm_too_big": 1.0,
        "cluster_accuracy.0": 0.8,
        "cluster_accuracy.1": 0.7,
        "numpy": 0.25,
    }
    assert flatten_metrics(row, prefix="evaluate_")["evaluate_fairness.gateway.accuracy"] == 0.9


def test_the_empty_and_zero_cases() -> None:
    assert flatten_metrics({}) == {}
    assert flatten_metrics({"failures": {}, "drops_by_stage": {}}) == {}
    assert flatten_metrics({"": 0, "x": {"": 0.0}}) == {"_": 0.0, "x._": 0.0}
    assert math.isnan(flatten_metrics({"loss": float("nan")})["loss"])  # a diverged loss shows
    assert as_metric(np.bool_(True)) == 1.0 and as_metric("1") is None and as_metric([1]) is None


def test_keys_that_would_merge_keep_apart_and_long_names_are_cut() -> None:
    merged = flatten_metrics({"a.b": 1, "a:b": 2, "a_b": 3})
    assert merged["a_b"] == 3.0  # the key that is its own name keeps it
    assert sorted(merged.values()) == [1.0, 2.0, 3.0]
    assert all(PORTABLE_NAME.fullmatch(name) for name in merged)
    long = flatten_metrics({"x" * 300: 1, "x" * 299 + "y": 2})
    assert sorted(long.values()) == [1.0, 2.0]
    assert all(len(name) == MAX_NAME_CHARS for name in long)
    assert name_part("day/night") == "day_night"


numbers_or_not = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3)
)
rows = st.recursive(
    numbers_or_not,
    lambda children: st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


def numeric_leaves(value: Any) -> int:
    if isinstance(value, dict):
        return sum(numeric_leaves(child) for child in value.values())
    return 0 if as_metric(value) is None else 1


@given(st.dictionaries(st.text(max_size=12), rows, max_size=6))
def test_every_number_gets_a_legal_name_of_its_own(row: dict[str, Any]) -> None:
    flat = flatten_metrics(row)
    assert len(flat) == numeric_leaves(row)  # none dropped, none overwritten
    for name in flat:
        assert PORTABLE_NAME.fullmatch(name) and len(name) <= MAX_NAME_CHARS, name


def test_every_figure_the_views_read_is_a_run_figure() -> None:
    """The dashboard's tiles, Prometheus' gauges and the contract's fields are the run's own:
    no client metric may take their names (accuracy and loss are the clients' by design)."""
    read = {key for key, _, _ in (*FIT_TILES, *EVALUATE_TILES)}
    read |= {*prometheus._ROW_GAUGES, *prometheus._TALLY_GAUGES, *prometheus._PRIVACY_GAUGES}
    read |= {field for _, fields in prometheus._QUANTILE_GAUGES.values() for field in fields}
    read |= set(contract_row())
    assert sorted(name for name in read if not is_run_figure(name)) == ["accuracy", "loss"]
    assert not is_run_figure("app_f1") and not is_run_figure("dp_sgd_epsilon")
