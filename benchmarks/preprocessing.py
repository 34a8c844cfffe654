"""Benchmark of federated preprocessing: what each pass costs against what it stands beside.

- ``moments``: a client's moments (:func:`shoal.preprocessing.local_moments`: clip, scale,
  mean of u and of u**2) of ``--records`` records of 30 features, against NumPy's own mean
  and variance of the same array: the best time of each, the two run alternately;
- ``statistics_run``: pass 1 of ``examples/federated-preprocessing`` with ``--hospitals``
  hospitals (``statistics.toml``), against one training round of the same hospitals
  (``train.toml`` with ``run.rounds = 1``), each simulated whole in this process, in the
  clear and under SecAgg+, taking turns ``--pairs`` times: the median of each, and their
  ratio;
- ``training``: pass 2 (``train.toml``, ``--rounds`` rounds, every task carrying the scaler
  and each client standardizing with it) against the same job on raw values, taking turns
  ``--pairs`` times: seconds per round (the median of each run's second half), the median
  of the pairs' ratios, and each one's final accuracy.

Prints one JSON object per measurement.

    python benchmarks/preprocessing.py --records 100000 --hospitals 30 --rounds 20 --pairs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from benchmarks.model_signing import best_ms, paired_rounds, steady_round_s
from shoal.preprocessing import FeatureBounds, local_moments
from shoal.simulation.api import simulate

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "federated-preprocessing"


def moments(*, records: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    features = (rng.normal(size=(records, 30)) * np.logspace(-2, 3, 30)).astype(np.float32)
    bounds = FeatureBounds.of(-10 * np.logspace(-2, 3, 30), 10 * np.logspace(-2, 3, 30))

    def numpy_moments() -> object:
        return features.mean(axis=0), features.var(axis=0)

    numpy_ms, shoal_ms = best_ms(numpy_moments, lambda: local_moments(features, bounds), repeats)
    return {
        "measure": "moments",
        "records": records,
        "features": 30,
        "numpy_ms": round(numpy_ms, 3),
        "shoal_ms": round(shoal_ms, 3),
        "ratio": round(shoal_ms / numpy_ms, 3),
    }


def job(name: str, **changes: dict[str, Any]) -> dict[str, Any]:
    """The example's job ``name`` as a mapping, its app found in the example's folder."""
    data = tomllib.loads((EXAMPLE / name).read_text())
    data.pop("coordinator", None)
    data["app"]["path"] = [str(EXAMPLE)]
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    return data


def seconds(config: dict[str, Any], folder: Path) -> float:
    started = time.perf_counter()
    simulate(config, out=folder)
    return time.perf_counter() - started


def statistics_run(*, hospitals: int, pairs_count: int) -> list[dict[str, Any]]:
    population = {"num_clients": hospitals}
    cohort = {"clients_per_round": hospitals}
    results = []
    for protocol in ("none", "secagg+"):
        secure = {"protocol": protocol}
        counted = job("statistics.toml", data=population, round=cohort, secure_aggregation=secure)
        pairs = []
        with tempfile.TemporaryDirectory() as folder:
            statistics_file = Path(folder) / "stats"
            trained = job(
                "train.toml",
                run={"rounds": 1},
                data=population,
                round=cohort,
                evaluation={"every": 0},
                secure_aggregation=secure,
                preprocessing={"statistics": str(statistics_file)},
            )
            seconds(counted, statistics_file)  # the file pass 2 reads (and a warm-up)
            for turn in range(pairs_count):
                one_round = seconds(trained, Path(folder) / f"train-{turn}")
                pass_one = seconds(counted, Path(folder) / f"stats-{turn}")
                pairs.append((one_round, pass_one))
        results.append(
            {
                "measure": "statistics_run",
                "protocol": protocol,
                "hospitals": hospitals,
                "training_round_s": round(statistics.median(p[0] for p in pairs), 3),
                "statistics_run_s": round(statistics.median(p[1] for p in pairs), 3),
                "ratio": round(statistics.median(p[1] / p[0] for p in pairs), 3),
            }
        )
    return results


def training(*, rounds: int, pairs_count: int) -> dict[str, Any]:
    def per_round(config: dict[str, Any], folder: Path) -> tuple[float, float]:
        result = simulate(config, out=folder)
        return steady_round_s(result.rows), result.summary["final_accuracy"]

    pairs = []
    with tempfile.TemporaryDirectory() as folder:
        statistics_file = Path(folder) / "stats"
        simulate(job("statistics.toml"), out=statistics_file)
        scaled = job(
            "train.toml", run={"rounds": rounds}, preprocessing={"statistics": str(statistics_file)}
        )
        raw = job("train.toml", run={"rounds": rounds})
        raw.pop("preprocessing")
        for turn in range(pairs_count):  # taking turns: the machine's spells fall on both alike
            raw_s, raw_accuracy = per_round(raw, Path(folder) / f"raw-{turn}")
            scaled_s, scaled_accuracy = per_round(scaled, Path(folder) / f"scaled-{turn}")
            pairs.append((raw_s, scaled_s))
    return {
        "measure": "training",
        "rounds": rounds,
        **paired_rounds(pairs, baseline="raw", measured="scaled"),
        "accuracy": {"raw": raw_accuracy, "scaled": scaled_accuracy},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hospitals", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(moments(records=args.records, repeats=args.repeats)))
    for result in statistics_run(hospitals=args.hospitals, pairs_count=args.pairs):
        print(json.dumps(result))
    print(json.dumps(training(rounds=args.rounds, pairs_count=args.pairs)))


if __name__ == "__main__":
    main()
