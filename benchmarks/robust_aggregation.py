"""Benchmark of the robust aggregators (median, trimmed mean) against numpy and SciPy.

For K updates of P float32 values, times Shoal's ``CoordinateMedian`` and
``TrimmedMean`` (K ``accumulate`` calls, each checking and copying its
update, then ``finalize``) against what one would write on a ready (K, P)
matrix: ``numpy.median(stacked, axis=0)`` and
``scipy.stats.trim_mean(stacked, ratio, axis=0)``. The baselines get their
matrix for free. Best of ``--repeats`` each, the contenders interleaved in
two rounds, in the same process. Checks that the median is numpy's bit for
bit and the trimmed mean SciPy's within float32 rounding. Prints one JSON
object per K.

    python benchmarks/robust_aggregation.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from aggregation import best_seconds
from shoal.aggregation import Aggregator, CoordinateMedian, TrimmedMean

Vector = npt.NDArray[np.float32]
TRIM_RATIO = 0.1


def aggregate(rule: Aggregator, updates: Sequence[Vector]) -> Vector:
    state = rule.init(num_parameters=updates[0].size)
    for update in updates:
        state = rule.accumulate(state, update, weight=1.0)
    result: Vector = rule.finalize(state)
    return result


def measure(*, num_updates: int, num_parameters: int, repeats: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    updates = [rng.standard_normal(num_parameters, dtype=np.float32) for _ in range(num_updates)]
    stacked = np.stack(updates)
    median, trimmed = CoordinateMedian(), TrimmedMean(trim_ratio=TRIM_RATIO)
    contenders: dict[str, Callable[[], object]] = {
        "numpy_median": lambda: np.median(stacked, axis=0),
        "shoal_median": lambda: aggregate(median, updates),
        "scipy_trim_mean": lambda: stats.trim_mean(stacked, TRIM_RATIO, axis=0),
        "shoal_trimmed_mean": lambda: aggregate(trimmed, updates),
    }
    best = dict.fromkeys(contenders, math.inf)
    for _ in range(2):  # two interleaved rounds: no contender always runs after another
        for name, function in contenders.items():
            best[name] = min(best[name], best_seconds(function, repeats=repeats))
    if not np.array_equal(aggregate(median, updates), np.median(stacked, axis=0)):
        raise AssertionError("the coordinate median differs from numpy's")
    reference = stats.trim_mean(stacked.astype(np.float64), TRIM_RATIO, axis=0)
    if not np.allclose(aggregate(trimmed, updates), reference, rtol=1e-6, atol=1e-7):
        raise AssertionError("the trimmed mean differs from SciPy's")
    return {
        "benchmark": "robust_aggregation",
        "num_updates": num_updates,
        "num_parameters": num_parameters,
        "trim_ratio": TRIM_RATIO,
        **{f"{name}_seconds": round(seconds, 5) for name, seconds in best.items()},
        "median_speedup_over_numpy": round(best["numpy_median"] / best["shoal_median"], 2),
        "trimmed_mean_speedup_over_scipy": round(
            best["scipy_trim_mean"] / best["shoal_trimmed_mean"], 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--updates", type=int, nargs="+", default=[10, 11, 100])
    parser.add_argument("--parameters", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for count in args.updates:
        report = measure(
            num_updates=count,
            num_parameters=args.parameters,
            repeats=args.repeats,
            seed=args.seed,
        )
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
