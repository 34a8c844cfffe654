"""A round's divergence and drift made at once, from one copy of the updates."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from shoal.aggregation.divergence import DivergenceRule, measure_divergence
from shoal.aggregation.drift import SENT_WHOLE_UP_TO, DriftRule, measure_drift, sent_together
from shoal.aggregation.measures import measure_both, measures_later
from shoal.core.later import Later, Ready, here


def updates(count: int, size: int, *, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, size)).astype(np.float32)


def test_both_measures_are_each_ones_own() -> None:
    names = [f"client-{index}" for index in range(7)]
    rows = updates(7, 40)
    aggregate = rows.mean(axis=0)
    rules = DivergenceRule(), DriftRule(max_clusters=3)
    divergence, drift = measure_both(names, rows, aggregate, *rules, 11)
    assert divergence == measure_divergence(names, rows, aggregate, rule=rules[0], seed=11)
    assert drift == measure_drift(names, rows, rule=rules[1], seed=11)


def test_offloaded_both_come_back_as_two_reports_from_one_task() -> None:
    sent: list[tuple[Any, ...]] = []

    def offload(function: Callable[..., Any], /, *args: Any) -> Later[Any]:
        sent.append(args)
        value = function(*pickle.loads(pickle.dumps(args)))  # as a worker gets them

        class Elsewhere:
            def result(self) -> Any:
                return value

        return Elsewhere()

    names = [f"client-{index}" for index in range(5)]
    rows = updates(5, 30, seed=2)
    rules = {"divergence": DivergenceRule(), "drift": DriftRule()}
    divergence, drift = measures_later(
        names, rows, rows.mean(axis=0), **rules, seed=3, offload=offload
    )
    at_once = measures_later(names, rows, rows.mean(axis=0), **rules, seed=3, offload=here)
    assert all(isinstance(report, Ready) for report in at_once)  # here: the reports as they are
    assert (divergence.result(), drift.result()) == tuple(r.result() for r in at_once)
    assert len(sent) == 1 and sent[0][1] is rows  # the updates went once


def test_updates_go_together_up_to_the_bound() -> None:
    assert sent_together(np.zeros((4, SENT_WHOLE_UP_TO // 4), np.float32))
    assert not sent_together(np.zeros((4, SENT_WHOLE_UP_TO // 4 + 1), np.float32))
    assert sent_together(np.zeros((0, 0), np.float32))
