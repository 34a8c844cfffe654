"""Benchmark of streaming weighted-mean aggregation against a stacked numpy product.

For K updates of P float32 values, times ``WeightedMean`` (K ``accumulate``
calls, each checking the update's shape and weight, then ``finalize``) and
the baseline ``(weights @ stacked) / weights.sum()`` on a ready (K, P)
float32 matrix, best of ``--repeats`` each, in the same process. The
baseline is given its matrix for free: building it from K arriving updates
would cost a copy of all of them. ``init`` (allocating the running sum at
round start) is timed apart, and so is the coordinator's whole path, which
also reads each update once to reject NaN and infinity where it enters.
Prints one JSON object per K.

    python benchmarks/aggregation.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from shoal.aggregation import MeanState, WeightedMean
from shoal.core import all_finite

Vector = npt.NDArray[np.float32]


def best_seconds(function: Callable[[], object], *, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def aggregate(
    rule: WeightedMean, state: MeanState, updates: Sequence[Vector], weights: Vector
) -> Vector:
    for update, weight in zip(updates, weights, strict=True):
        state = rule.accumulate(state, update, weight=float(weight))
    return rule.finalize(state)


def measure(*, num_updates: int, num_parameters: int, repeats: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    updates = [rng.standard_normal(num_parameters, dtype=np.float32) for _ in range(num_updates)]
    weights = rng.uniform(1.0, 1000.0, num_updates).astype(np.float32)
    stacked = np.stack(updates)
    rule = WeightedMean()

    def numpy_baseline() -> Vector:
        result: Vector = (weights @ stacked) / weights.sum()
        return result

    states = iter([rule.init(num_parameters=num_parameters) for _ in range(4 * repeats)])

    def shoal_mean() -> Vector:
        return aggregate(rule, next(states), updates, weights)

    def checked_mean() -> Vector:
        # the coordinator's path: every update is checked for NaN and inf where
        # it enters (one read), then folded into the mean
        state = next(states)
        for update, weight in zip(updates, weights, strict=True):
            if not all_finite(update):
                raise AssertionError("benchmark updates are finite")
            state = rule.accumulate(state, update, weight=float(weight))
        return rule.finalize(state)

    # Two interleaved rounds, so no contender always runs right after another.
    contenders = (numpy_baseline, shoal_mean, checked_mean)
    best = [math.inf] * len(contenders)
    for _ in range(2):
        for position, function in enumerate(contenders):
            best[position] = min(best[position], best_seconds(function, repeats=repeats))
    baseline, ours, checked = best
    init = best_seconds(lambda: rule.init(num_parameters=num_parameters), repeats=repeats)

    reference = np.average(stacked.astype(np.float64), axis=0, weights=weights.astype(np.float64))
    result = aggregate(rule, rule.init(num_parameters=num_parameters), updates, weights)
    gigabytes = stacked.nbytes / 1e9
    return {
        "benchmark": "weighted_mean",
        "num_updates": num_updates,
        "num_parameters": num_parameters,
        "seconds": ours,
        "gb_per_s": gigabytes / ours,
        "init_seconds": init,
        "numpy_seconds": baseline,
        "numpy_gb_per_s": gigabytes / baseline,
        "throughput_ratio_to_numpy": baseline / ours,
        "with_finite_check_seconds": checked,
        "with_finite_check_ratio_to_numpy": baseline / checked,
        "max_abs_error_vs_float64": float(np.max(np.abs(result - reference))),
        "repeats": repeats,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="repetitions; the best one counts")
    parser.add_argument("--num-parameters", type=int, default=1_000_000)
    parser.add_argument("--num-updates", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    for num_updates in args.num_updates:
        row = measure(
            num_updates=num_updates,
            num_parameters=args.num_parameters,
            repeats=args.repeats,
            seed=args.seed,
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
