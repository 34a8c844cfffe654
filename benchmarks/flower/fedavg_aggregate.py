"""Times Flower's FedAvg weighted average (``aggregate`` of its strategies); runs in Flower's venv.

The function is ``flwr.server.strategy.aggregate.aggregate``.
``benchmarks/aggregation.py`` runs this script with the interpreter of
Flower's own virtual environment (Flower 1.42 and Shoal need different
protobuf and Ray versions) and reads the one JSON object it prints. The
inputs have the shape of Shoal's side: K updates of P float32 values, each
a single layer, with integer example counts as Flower's API takes them.
The figure is the best of ``--repeats`` calls.

    .bench/flower-venv/bin/python benchmarks/flower/fedavg_aggregate.py --num-updates 10
"""

from __future__ import annotations

import argparse
import json
import time

import flwr
import numpy as np
from flwr.server.strategy.aggregate import aggregate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-updates", type=int, default=10)
    parser.add_argument("--num-parameters", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    updates = [
        rng.standard_normal(args.num_parameters, dtype=np.float32) for _ in range(args.num_updates)
    ]
    examples = rng.integers(1, 1000, args.num_updates)
    results = [([update], int(count)) for update, count in zip(updates, examples, strict=True)]
    timings = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        (mean,) = aggregate(results)
        timings.append(time.perf_counter() - began)
    reference = np.average(np.stack(updates).astype(np.float64), axis=0, weights=examples)
    print(
        json.dumps(
            {
                "flower_version": flwr.__version__,
                "num_updates": args.num_updates,
                "num_parameters": args.num_parameters,
                "seconds": min(timings),
                "timings": timings,
                "dtype": str(mean.dtype),
                "max_abs_error_vs_float64": float(np.max(np.abs(mean - reference))),
            }
        )
    )


if __name__ == "__main__":
    main()
