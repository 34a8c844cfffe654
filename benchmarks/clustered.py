"""Benchmark of clustered FL against one global model on day and night devices.

Runs ``examples/day-night/job.toml`` three times on the same population and
seed: with one global model (``clustering.clusters = 1``, the baseline), with
two cluster models from round 1 (IFCA, ``start = "always"``), and with one
model that splits into two when the drift flags the populations (``start =
"flagged"``). Each population's accuracy is measured as federated evaluation
does: every client scores the final model on its own held-out digits (a
clustered model: the cluster model with the lowest loss there), weighted by
examples. Prints one JSON object: each population's accuracy under each, the
ratios clustered / single and flagged / single, and the round the flagged run
split at.

    python benchmarks/clustered.py --rounds 20 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shoal.config import load_config
from shoal.simulation.runner import Simulation, final_parameters

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "day-night"
sys.path.insert(0, str(EXAMPLE))

import app as day_night  # noqa: E402 (the example's own module, found on its folder)


def run(*, clusters: int, rounds: int, seed: int, start: str = "always") -> dict[str, Any]:
    """One run of the example; each population's accuracy, the run's wall time and the round
    its model split at (None: it did not, or it never had one model)."""
    overrides = [
        f"clustering.clusters={clusters}",
        f"clustering.start='{start}'",
        f"run.rounds={rounds}",
        f"run.seed={seed}",
    ]
    config = load_config(EXAMPLE / "job.toml", overrides)
    with tempfile.TemporaryDirectory() as folder:
        start_time = time.perf_counter()
        summary = Simulation(config, folder, search_path=[EXAMPLE]).run()
        wall = time.perf_counter() - start_time
        parameters = final_parameters(folder)
        rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").open()]
    split = next((row["round"] for row in rows if "clustered_split" in row), None)
    accuracy = day_night.population_accuracy(
        parameters, clusters=clusters, num_clients=config.data.num_clients, seed=seed
    )
    return {
        "accuracy": accuracy,
        "wall_time_s": wall,
        "rounds": summary["rounds_completed"],
        "split_round": split,
    }


def ratios(arm: dict[str, Any], single: dict[str, Any]) -> dict[str, float]:
    """Each population's accuracy under ``arm`` over its accuracy under one global model."""
    baseline = single["accuracy"]
    return {which: arm["accuracy"][which] / baseline[which] for which in baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        single = run(clusters=1, rounds=args.rounds, seed=seed)
        clustered = run(clusters=2, rounds=args.rounds, seed=seed)
        flagged = run(clusters=2, rounds=args.rounds, seed=seed, start="flagged")
        populations = sorted(single["accuracy"])
        results.append(
            {
                "seed": seed,
                "rounds": args.rounds,
                "single": single["accuracy"],
                "clustered": clustered["accuracy"],
                "flagged": flagged["accuracy"],
                "flagged_split_round": flagged["split_round"],
                "ratio": ratios(clustered, single),
                "ratio_flagged": ratios(flagged, single),
                "clustered_beats_single_everywhere": all(
                    clustered["accuracy"][which] > single["accuracy"][which]
                    for which in populations
                ),
                "flagged_beats_single_everywhere": all(
                    flagged["accuracy"][which] > single["accuracy"][which] for which in populations
                ),
                "wall_time_s": {
                    "single": single["wall_time_s"],
                    "clustered": clustered["wall_time_s"],
                    "flagged": flagged["wall_time_s"],
                },
            }
        )
    print(json.dumps(results if len(results) > 1 else results[0], indent=2))


if __name__ == "__main__":
    main()
