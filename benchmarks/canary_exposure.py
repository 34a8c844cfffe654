"""Benchmark: the exposure of planted canaries (Carlini et al. 2019), with and without user DP.

The scenario is the embedded default (digits, 100 phones, 20 per round),
with ``[canaries]`` on: ``--count`` random records (features uniform over
each pixel's range, a random label), each held by ``--holders`` clients in
``--repeats`` copies, scored against 1,000 references drawn the same way
and never planted. Each seed runs without DP (the baseline, in the same
invocation) and with central user-level DP at each target epsilon (the
noise multiplier calibrated to spend it over the planned rounds). Prints
one JSON line per setting: the canaries' mean and largest exposure, the
extrapolated exposure, the clean level (the exposure of control records
drawn the same way but never planted, measured in the same run), the
accuracy, the epsilon spent and the ratio of the exposure to the one
without DP.

    python benchmarks/canary_exposure.py --seeds 3 --epsilons 1 4 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

from shoal.config import load_config
from shoal.simulation.runner import Simulation


def run(overrides: list[str]) -> dict[str, Any]:
    """One run of the embedded default scenario with ``overrides``; its summary."""
    config = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dp-accounting's numerical notes
        return Simulation(config, Path(folder) / "run").run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--holders", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    common = [
        f"run.rounds={args.rounds}",
        "evaluation.every=0",
        f"simulation.workers={args.workers}",
        "canaries.enabled=true",
        f"canaries.holders={args.holders}",
        f"canaries.repeats={args.repeats}",
        f"canaries.count={args.count}",
    ]
    seeds = list(range(args.seeds))
    plain = [run([*common, f"run.seed={seed}"]) for seed in seeds]
    baseline = statistics.fmean(s["canary_exposure"]["mean"] for s in plain)
    print(json.dumps(_line(None, plain, baseline, args)))
    for epsilon in args.epsilons:
        private = [
            run(
                [
                    *common,
                    f"run.seed={seed}",
                    "privacy.placement='central'",
                    f"privacy.epsilon={epsilon}",
                ]
            )
            for seed in seeds
        ]
        print(json.dumps(_line(epsilon, private, baseline, args)))


def _line(
    epsilon: float | None,
    summaries: list[dict[str, Any]],
    baseline: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    exposures = [s["canary_exposure"] for s in summaries]
    means = [e["mean"] for e in exposures]
    extrapolated = [statistics.fmean(e["extrapolated"]) for e in exposures]
    accuracies = [s["final_accuracy"] for s in summaries]
    mean = statistics.fmean(means)
    return {
        "benchmark": "canary_exposure",
        "privacy": "none" if epsilon is None else "central",
        "target_epsilon": epsilon,
        "epsilon_spent": None if epsilon is None else max(s["epsilon"] for s in summaries),
        "delta": summaries[0].get("delta"),
        "noise_multiplier": summaries[0].get("noise_multiplier"),
        "seeds": len(summaries),
        "holders": args.holders,
        "repeats": args.repeats,
        "canaries": args.count,
        "max_by_rank": exposures[0]["max_by_rank"],
        "exposure_mean": round(mean, 3),
        "exposure_min_seed": round(min(means), 3),
        "exposure_max_seed": round(max(means), 3),
        "exposure_largest": max(e["max"] for e in exposures),
        "extrapolated_mean": round(statistics.fmean(extrapolated), 3),
        "unplanted_mean": round(statistics.fmean(e["unplanted_mean"] for e in exposures), 3),
        "accuracy_mean": round(statistics.fmean(accuracies), 4),
        "accuracy_min": round(min(accuracies), 4),
        "accuracy_max": round(max(accuracies), 4),
        "ratio_to_no_dp": round(mean / baseline, 4),
    }


if __name__ == "__main__":
    main()
