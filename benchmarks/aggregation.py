"""Benchmark of streaming weighted-mean aggregation against numpy and against Flower's FedAvg.

For K updates of P float32 values, times ``WeightedMean`` (K ``accumulate``
calls, each checking the update's shape and weight, then ``finalize``) and
the baseline ``(weights @ stacked) / weights.sum()`` on a ready (K, P)
float32 matrix, best of ``--repeats`` each, in the same process. The
baseline is given its matrix for free: building it from K arriving updates
would cost a copy of all of them. ``init`` (allocating the running sum at
round start) is timed apart, and so is the coordinator's whole path, which
also reads each update once to reject NaN and infinity where it enters;
that check is also timed alone, per million values.

Flower's FedAvg ``aggregate`` on the same shapes runs in the same
invocation, in Flower's own virtual environment (``benchmarks/flower_venv.py``;
``--skip-flower`` leaves it out). Prints one JSON object per K.

    python benchmarks/aggregation.py --repeats 7
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from flower_venv import FlowerUnavailable, add_flower_arguments, flower_python, run_flower
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


def measure(
    *,
    num_updates: int,
    num_parameters: int,
    repeats: int,
    seed: int,
    flower: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, object]:
    """Shoal's figures for K updates; ``flower`` runs Flower's side between Shoal's two rounds."""
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

    def finite_check() -> bool:
        return all(all_finite(update) for update in updates)

    # Two interleaved rounds, so no contender always runs right after another, and
    # Flower's side between them, so that neither side gets only a quiet spell.
    contenders = (numpy_baseline, shoal_mean, checked_mean, finite_check)
    best = [math.inf] * len(contenders)
    flower_report: dict[str, Any] = {}
    for turn in range(2):
        if turn == 1 and flower is not None:
            flower_report = flower()
        for position, function in enumerate(contenders):
            best[position] = min(best[position], best_seconds(function, repeats=repeats))
    baseline, ours, checked, check_alone = best
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
        "finite_check_seconds": check_alone,
        "finite_check_ms_per_million_values": check_alone / (num_updates * num_parameters) * 1e9,
        "max_abs_error_vs_float64": float(np.max(np.abs(result - reference))),
        "repeats": repeats,
        **_flower_figures(flower_report, ours),
    }


def _flower_figures(report: dict[str, Any], ours: float) -> dict[str, object]:
    if not report:
        return {}
    return {
        "flower_version": report["flower_version"],
        "flower_seconds": report["seconds"],
        "flower_max_abs_error_vs_float64": report["max_abs_error_vs_float64"],
        "speedup_vs_flower": report["seconds"] / ours,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="repetitions; the best one counts")
    parser.add_argument("--num-parameters", type=int, default=1_000_000)
    parser.add_argument("--num-updates", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--seed", type=int, default=0)
    add_flower_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        python = flower_python(args)
        for num_updates in args.num_updates:
            shape = [
                "--num-updates",
                str(num_updates),
                "--num-parameters",
                str(args.num_parameters),
            ]
            flower_arguments = [*shape, "--repeats", str(args.repeats), "--seed", str(args.seed)]
            row = measure(
                num_updates=num_updates,
                num_parameters=args.num_parameters,
                repeats=args.repeats,
                seed=args.seed,
                flower=None
                if python is None
                else functools.partial(run_flower, python, "fedavg_aggregate.py", flower_arguments),
            )
            print(json.dumps(row), flush=True)
    except FlowerUnavailable as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
