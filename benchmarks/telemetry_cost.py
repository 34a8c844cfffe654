"""The FL telemetry's cost per round, pooled over fresh processes, beside a control.

``benchmarks/simulation.py`` gives the cost from one process: its runs with and without
the telemetry take turns, and the ratio of each turn pair has a bootstrap interval. That
interval holds the turns' noise, not the process's: two invocations of the same benchmark
differ by more than their intervals say (one process's memory layout, where the scheduler
puts its threads and its pool's workers, the machine's spell). This benchmark runs the
same pairing (:func:`simulation.telemetry_ratio`, the workload's own pool unless
``--in-process``) in ``--invocations`` fresh processes, one after the other, and pools
their turn pairs: the median over all of them, with a two-level bootstrap 95% interval
(invocations drawn with replacement, then each one's turn pairs), which carries both
kinds of noise. ``--control`` runs the very same pairing with the telemetry in the same
state in both runs (off in two pairs, on in the next two): its figure shows what the
pairing reads between two identical runs, so its interval should hold 1.0.

    python benchmarks/telemetry_cost.py --workload overhead-100 --invocations 12
    python benchmarks/telemetry_cost.py --workload overhead-100 --invocations 12 --control

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from benchmarks import simulation


def pooled_interval(
    groups: Sequence[Sequence[float]], *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A two-level bootstrap 95% interval of the median of the pooled ``groups`` (each one
    invocation's turn-pair ratios): each resample draws the groups with replacement, then
    each drawn group's values with replacement, and takes the median of them all. Seeded:
    the same groups give the same interval."""
    kept = [np.asarray(group, dtype=np.float64) for group in groups if len(group)]
    if not kept:
        raise ValueError("no ratios to pool")
    rng = np.random.default_rng(seed)
    medians = np.empty(resamples)
    for index in range(resamples):
        drawn = rng.integers(0, len(kept), size=len(kept))
        values = [rng.choice(kept[group], size=kept[group].size) for group in drawn]
        medians[index] = np.median(np.concatenate(values))
    low, high = np.quantile(medians, [0.025, 0.975])
    return float(low), float(high)


def one_invocation(args: argparse.Namespace) -> list[float]:
    """The turn-pair ratios of one fresh process running the pairing."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--workload", args.workload,
        "--rounds", str(args.rounds),
        "--repeats", str(args.repeats),
        *(["--control"] if args.control else []),
        *(["--in-process"] if args.in_process else []),
    ]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    ratios: list[float] = json.loads(done.stdout.strip().splitlines()[-1])
    return ratios


def child(args: argparse.Namespace) -> None:
    *_, turns = simulation.telemetry_ratio(
        simulation.EXAMPLES / f"{args.workload}.toml",
        rounds=args.rounds,
        repeats=args.repeats,
        in_process=args.in_process,
        control=args.control,
    )
    print(json.dumps(turns), flush=True)


def summary(args: argparse.Namespace, groups: list[list[float]]) -> dict[str, Any]:
    low, high = pooled_interval(groups)
    pooled = [ratio for group in groups for ratio in group]
    return {
        "benchmark": "telemetry_cost",
        "workload": args.workload,
        "pool": not args.in_process,
        "control": args.control,
        "rounds": args.rounds,
        "pairs_per_invocation": args.repeats,
        "invocations": len(groups),
        "turn_pairs": len(pooled),
        "telemetry_ratio": round(float(np.median(pooled)), 4),
        "telemetry_ratio_interval": [round(low, 4), round(high, 4)],
        "median_of_each_invocation": [round(float(np.median(group)), 4) for group in groups],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="overhead-100")
    parser.add_argument("--invocations", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=8, help="pairs of runs per invocation")
    parser.add_argument("--control", action="store_true", help="both runs alike")
    parser.add_argument("--in-process", action="store_true", help="no pool: one process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    groups = [one_invocation(args) for _ in range(args.invocations)]
    print(json.dumps(summary(args, groups)), flush=True)


if __name__ == "__main__":
    main()
