"""A round's metric is the mean over the results that reported it, weighted by their examples.

Before, each metric's example-weighted sum was divided by all the round's examples: a
client that reported no ``f1`` (another app version) or a NaN one pulled the round's
``f1`` towards 0 (0.56 where every reporting client said about 0.88).
"""

from __future__ import annotations

import math

import pytest

from shoal.coordinator.rounds import ClusterBooks, add_metrics, metric_means


def test_a_metric_is_averaged_over_the_results_that_reported_it() -> None:
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    add_metrics(sums, weights, 30, {"f1": 0.9, "accuracy": 0.8})
    add_metrics(sums, weights, 10, {"f1": 0.8, "accuracy": math.nan})
    add_metrics(sums, weights, 60, {"accuracy": 0.5, "note": "text"})
    means = metric_means(sums, weights, 100)
    assert means["f1"] == pytest.approx((30 * 0.9 + 10 * 0.8) / 40)
    assert means["accuracy"] == pytest.approx((30 * 0.8 + 60 * 0.5) / 90)
    assert "note" not in means


def test_a_sum_set_whole_is_over_all_the_rounds_examples() -> None:
    assert metric_means({"dp_clip_norm": 2.0 * 50}, {}, 50) == {"dp_clip_norm": 2.0}
    assert metric_means({"loss": 1.0}, {}, 0) == {}


def test_a_clusters_means_are_over_its_reporting_clients_too() -> None:
    books = ClusterBooks()
    books.add(20, {"accuracy": 0.9})
    books.add(20, {})
    assert books.means() == {"accuracy": pytest.approx(0.9)}
