"""Benchmark of the simulator's overhead against the same math in a bare numpy loop.

Runs ``examples/overhead-100.toml`` and ``examples/overhead-1000.toml``
through the real simulator (coordinator, device fleet, process pool, version
store, metrics log) and times seconds per round once every client's data
exists (the second half of the run), and over the whole run. The
baseline is a bare single-process numpy loop doing the same math on data it
already holds: pick the cohort, run 5 full-batch softmax-regression steps per
client, average the deltas weighted by examples. The bare loop, the simulator
with its process pool and the simulator in one process run in turn,
``--sittings`` times; each ratio is the median of the sittings' ratios (each
sitting's are printed too). A third figure is the time
from launching ``shoal simulate`` as a fresh process until it prints its
first round. The cost of the FL telemetry (the fleet figures of ``[telemetry]``
and the drift projection of ``[drift]``) is the in-process run's seconds per
round with both on over the same run with both off, the two runs taking turns
round by round, in ``--repeats`` pairs: the median of the pairs' ratios.
Prints one JSON object per workload.

    python benchmarks/simulation.py --rounds 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.config import Config, load_config
from shoal.simulation.runner import Simulation

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
Matrix = npt.NDArray[np.float32]


def bare_numpy_seconds_per_round(config: Config, *, rounds: int) -> float:
    """The same math with nothing around it: the loop an expert would write by hand."""
    data, model = config.data, config.client
    rng = np.random.default_rng(0)
    means = rng.normal(size=(data.num_classes, data.num_features)).astype(np.float32)
    features = []
    labels = []
    for _ in range(data.num_clients):
        y = rng.integers(0, data.num_classes, data.samples_per_client)
        features.append(means[y] + rng.normal(size=(y.size, data.num_features)).astype(np.float32))
        labels.append(np.eye(data.num_classes, dtype=np.float32)[y])
    weights = np.zeros((data.num_features + 1) * data.num_classes, np.float32)
    steps = int(model.epochs)
    timings = []
    for _ in range(rounds):
        start = time.perf_counter()
        cohort = rng.choice(data.num_clients, config.round.clients_per_round, replace=False)
        total = np.zeros_like(weights)
        for client in cohort:
            local = _train(
                weights, features[client], labels[client], steps=steps, lr=model.learning_rate
            )
            total += (local - weights) * len(labels[client])
        weights = weights + total / (len(cohort) * data.samples_per_client)
        timings.append(time.perf_counter() - start)
    return float(np.median(timings[1:]))


def _train(weights: Matrix, x: Matrix, onehot: Matrix, *, steps: int, lr: float) -> Matrix:
    local = weights.copy()
    num_features = x.shape[1]
    w = local[: num_features * onehot.shape[1]].reshape(num_features, -1)
    b = local[num_features * onehot.shape[1] :]
    for _ in range(steps):
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        error = (probabilities - onehot) / len(x)
        w -= lr * (x.T @ error)
        b -= lr * error.sum(axis=0)
    return local


def simulator_seconds_per_round(config: Config) -> tuple[float, float, float]:
    """Seconds per round in the second half of the run (every client's data is
    built by then, as the bare loop's is from the start), seconds per round over
    the whole run, and seconds until round 1 is done."""
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        Simulation(config, Path(folder) / "run").run(
            on_round=lambda row: stamps.append(time.perf_counter())
        )
    gaps = np.diff(stamps)
    return float(np.median(gaps[len(gaps) // 2 :])), float(np.mean(gaps)), stamps[0] - start


def seconds_to_first_round(config_path: Path) -> float:
    """Launch ``shoal simulate`` as a new process; time until it prints round 1."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "shoal", "simulate", str(config_path),
             "--rounds", "2", "--out", str(Path(folder) / "run")],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert process.stdout is not None
        elapsed = float("nan")
        for line in process.stdout:
            if line.split()[:2] == ["1", "fit"]:
                elapsed = time.perf_counter() - start
                break
        process.communicate()
        return elapsed


def telemetry_ratio(path: Path, *, rounds: int, repeats: int) -> tuple[float, float, list[float]]:
    """Seconds per round in process with the telemetry on and off, and the ratio of each of
    ``repeats`` pairs of runs. A pair's two runs take turns round by round (two threads
    handing a baton back and forth, only one ever running), so each round with the telemetry
    meets the machine as the round without it met it a moment before: on a shared machine
    whose speed drifts by 10% from one run to the next, two runs one after the other differ by
    more than the telemetry costs. Each run's figure is the median of its second half's
    rounds; the first figures returned are the medians over the pairs."""
    timings: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(repeats):
        order = (True, False) if repeat % 2 == 0 else (False, True)  # who goes first
        configs = [_telemetry_config(path, rounds=rounds, enabled=enabled) for enabled in order]
        for enabled, gaps in zip(order, _taking_turns(configs), strict=True):
            timings[enabled].append(float(np.median(gaps[len(gaps) // 2 :])))
    ratios = [on / off for on, off in zip(timings[True], timings[False], strict=True)]
    return float(np.median(timings[True])), float(np.median(timings[False])), ratios


def _telemetry_config(path: Path, *, rounds: int, enabled: bool) -> Config:
    switch = str(enabled).lower()
    overrides = [f"run.rounds={rounds}", "simulation.workers=0"]
    return load_config(path, [*overrides, f"telemetry.enabled={switch}", f"drift.enabled={switch}"])


def _taking_turns(configs: list[Config]) -> list[list[float]]:
    """Run the simulations one round each in turn; each one's seconds per round (the time
    from being handed the turn until its next round is done)."""
    count = len(configs)
    turns = [threading.Semaphore(0) for _ in configs]
    gaps: list[list[float]] = [[] for _ in configs]
    failures: list[BaseException] = []

    def play(index: int, config: Config, folder: Path) -> None:
        turns[index].acquire()
        started = time.perf_counter()

        def on_round(row: dict[str, Any]) -> None:
            nonlocal started
            gaps[index].append(time.perf_counter() - started)
            turns[(index + 1) % count].release()
            turns[index].acquire()
            started = time.perf_counter()

        try:
            Simulation(config, folder / f"run-{index}").run(on_round=on_round)
        except BaseException as exc:  # the others must not wait for a turn that never comes
            failures.append(exc)
        finally:
            turns[(index + 1) % count].release()

    with tempfile.TemporaryDirectory() as folder:
        threads = [
            threading.Thread(target=play, args=(index, config, Path(folder)))
            for index, config in enumerate(configs)
        ]
        for thread in threads:
            thread.start()
        turns[0].release()
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]
    return gaps


def measure(name: str, *, rounds: int, repeats: int = 5, sittings: int = 3) -> dict[str, Any]:
    path = EXAMPLES / f"{name}.toml"
    config = load_config(path, [f"run.rounds={rounds}"])
    serial_config = load_config(path, [f"run.rounds={rounds}", "simulation.workers=0"])
    # the bare loop, the pool and one process in turn, ``sittings`` times: on a shared machine
    # whose speed drifts from minute to minute, each sitting's ratio compares runs a few
    # seconds apart, and the median of the sittings' ratios is the figure
    pooled: list[float] = []
    serials: list[float] = []
    baselines: list[float] = []
    whole_runs: list[float] = []
    first_rounds: list[float] = []
    for _ in range(sittings):
        baselines.append(bare_numpy_seconds_per_round(config, rounds=rounds))
        per_round, whole_run, first_round = simulator_seconds_per_round(config)
        pooled.append(per_round)
        whole_runs.append(whole_run)
        first_rounds.append(first_round)
        serials.append(simulator_seconds_per_round(serial_config)[0])
    ratios = [run / bare for run, bare in zip(pooled, baselines, strict=True)]
    serial_ratios = [run / bare for run, bare in zip(serials, baselines, strict=True)]
    with_telemetry, without_telemetry, telemetry_ratios = telemetry_ratio(
        path, rounds=rounds, repeats=repeats
    )
    return {
        "benchmark": "simulation_overhead",
        "workload": name,
        "clients": config.data.num_clients,
        "clients_per_round": config.round.clients_per_round,
        "rounds": rounds,
        "sittings": sittings,
        "seconds_per_round": round(float(np.median(pooled)), 5),
        "seconds_per_round_including_data_generation": round(float(np.median(whole_runs)), 5),
        "seconds_per_round_in_process": round(float(np.median(serials)), 5),
        "bare_numpy_seconds_per_round": round(float(np.median(baselines)), 5),
        "ratio_to_bare_numpy": round(float(np.median(ratios)), 3),
        "ratio_to_bare_numpy_of_each_sitting": [round(ratio, 3) for ratio in ratios],
        "ratio_in_process_to_bare_numpy": round(float(np.median(serial_ratios)), 3),
        "ratio_in_process_of_each_sitting": [round(ratio, 3) for ratio in serial_ratios],
        "seconds_to_first_round_in_process": round(float(np.median(first_rounds)), 3),
        "seconds_per_round_in_process_with_telemetry": round(with_telemetry, 5),
        "seconds_per_round_in_process_without_telemetry": round(without_telemetry, 5),
        "telemetry_ratio": round(float(np.median(telemetry_ratios)), 4),
        "telemetry_ratio_of_each_pair": [round(ratio, 4) for ratio in telemetry_ratios],
        "seconds_from_launch_to_first_round": round(seconds_to_first_round(path), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--workloads", nargs="+", default=["overhead-100", "overhead-1000"])
    parser.add_argument("--repeats", type=int, default=5, help="telemetry on/off pairs")
    parser.add_argument(
        "--sittings", type=int, default=3, help="bare loop, pool and one process, in turn"
    )
    args = parser.parse_args()
    for name in args.workloads:
        figures = measure(name, rounds=args.rounds, repeats=args.repeats, sittings=args.sittings)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
