"""Benchmark: what user-level DP costs in accuracy, on examples/dp-synthetic.toml.

For each seed, the scenario runs without DP (the baseline, in the same run)
and with user-level DP at each target epsilon, for each placement: central
(the coordinator adds the noise) and distributed (each client adds its share
inside SecAgg+). The noise multiplier is calibrated so that the planned
rounds spend the target. Prints one JSON line per setting: the mean and the
spread of the final accuracy over the seeds, the epsilon actually spent, and
the ratio to the non-private accuracy.

    python benchmarks/dp_utility.py --seeds 3 --epsilons 1 3 8
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

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "dp-synthetic.toml"
RECORD_LEVEL = EXAMPLES / "digits-dp-sgd.toml"


def run(overrides: list[str], example: Path = EXAMPLE) -> dict[str, Any]:
    config = load_config(example, overrides)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dp-accounting's numerical notes
        return Simulation(config, Path(folder) / "run").run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--placements", nargs="+", default=["central", "distributed"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--record-level", action="store_true", help="digits with DP-SGD instead (its own table)"
    )
    args = parser.parse_args()
    if args.record_level:
        record_level(list(range(args.seeds)))
        return
    common = [] if args.rounds is None else [f"run.rounds={args.rounds}"]
    seeds = list(range(args.seeds))
    baseline = [
        run([*common, f"run.seed={seed}", "privacy.placement='none'"])["final_accuracy"]
        for seed in seeds
    ]
    base_mean = statistics.fmean(baseline)
    print(json.dumps(_line("none", None, baseline, None, None, base_mean)))
    for placement in args.placements:
        secure = ["secure_aggregation.protocol='secagg+'"] if placement == "distributed" else []
        for epsilon in args.epsilons:
            summaries = [
                run(
                    [
                        *common,
                        *secure,
                        f"run.seed={seed}",
                        f"privacy.placement='{placement}'",
                        f"privacy.epsilon={epsilon}",
                    ]
                )
                for seed in seeds
            ]
            accuracies = [summary["final_accuracy"] for summary in summaries]
            spent = max(summary["epsilon"] for summary in summaries)
            noise = summaries[0]["noise_multiplier"]
            print(json.dumps(_line(placement, epsilon, accuracies, spent, noise, base_mean)))


def record_level(seeds: list[int]) -> None:
    """Digits with record-level DP-SGD (examples/digits-dp-sgd.toml) against the same without."""
    plain = [
        run([f"run.seed={seed}", "client.dp_sgd=false"], RECORD_LEVEL)["final_accuracy"]
        for seed in seeds
    ]
    private = [run([f"run.seed={seed}"], RECORD_LEVEL) for seed in seeds]
    accuracies = [summary["final_accuracy"] for summary in private]
    base = statistics.fmean(plain)
    print(json.dumps(_line("none (digits)", None, plain, None, None, base)))
    line = _line(
        "record-level DP-SGD (digits)",
        None,
        accuracies,
        max(summary["record_level_epsilon"] for summary in private),
        None,
        base,
    )
    line["delta"] = private[0]["record_level_delta"]
    print(json.dumps(line))


def _line(
    placement: str,
    epsilon: float | None,
    accuracies: list[float],
    spent: float | None,
    noise: float | None,
    baseline: float,
) -> dict[str, Any]:
    mean = statistics.fmean(accuracies)
    return {
        "benchmark": "dp_utility",
        "placement": placement,
        "target_epsilon": epsilon,
        "epsilon_spent": spent,
        "noise_multiplier": noise,
        "seeds": len(accuracies),
        "accuracy_mean": round(mean, 4),
        "accuracy_min": round(min(accuracies), 4),
        "accuracy_max": round(max(accuracies), 4),
        "ratio_to_non_private": round(mean / baseline, 4),
    }


if __name__ == "__main__":
    main()
