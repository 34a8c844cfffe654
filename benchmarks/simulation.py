"""Benchmark of the simulator's overhead against the same math in a bare numpy loop.

Runs ``examples/overhead-100.toml`` and ``examples/overhead-1000.toml``
through the real simulator (coordinator, device fleet, process pool, version
store, metrics log) and times seconds per round once every client's data
exists (the second half of the run), and over the whole run. The
baseline is a bare single-process numpy loop doing the same math on data it
already holds: pick the cohort, run 5 full-batch softmax-regression steps per
client, average the deltas weighted by examples. The simulator (with its
process pool, and in one process) and the bare loop take turns round by round,
``--sittings`` pairs each; each ratio is the median of the pairs' ratios (each
pair's is printed too). A third figure is the time from launching ``shoal
simulate`` as a fresh process until it prints its first round, with Python's
compiled modules written by a first launch as a user's Python writes them (and
once more without them where the environment sets ``PYTHONDONTWRITEBYTECODE``:
each launch then compiles Shoal's own modules). The cost of the FL telemetry
(the fleet figures of ``[telemetry]`` and the drift projection of ``[drift]``)
is the run's seconds per round with both on over the same run with both off,
the two runs taking turns every ten rounds, in ``--repeats`` pairs: the median
of the pairs' ratios; with the workload's pool (whose idle worker measures the
drift past the updates' Gram matrix) and in one process. Beside it, the same runs'
turns taken pair by pair (``*_by_turns``: each turn of ten rounds with the telemetry
against the turn without it next to it in time, over the runs' second halves), with a
bootstrap 95% interval of their median: ``--rounds`` and ``--repeats`` give more pairs.
That interval holds one process's noise only: ``benchmarks/telemetry_cost.py`` pools the
same pairing over fresh processes, beside a control, for the figure of record.
Prints one JSON object per workload.

    python benchmarks/simulation.py --rounds 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.config import Config, load_config
from shoal.simulation.runner import Simulation

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
Matrix = npt.NDArray[np.float32]


Player = Callable[[Path, Callable[[], None]], None]
"""Plays its rounds (in a folder of its own, if it needs one), calling the callable after
each round; see :func:`_taking_turns`."""


def bare_numpy_rounds(config: Config, *, rounds: int) -> Player:
    """The same math with nothing around it: the loop an expert would write by hand. Its data
    is made before it plays, as a simulation's clients have theirs by the second half."""
    data, model = config.data, config.client
    rng = np.random.default_rng(0)
    means = rng.normal(size=(data.num_classes, data.num_features)).astype(np.float32)
    features = []
    labels = []
    for _ in range(data.num_clients):
        y = rng.integers(0, data.num_classes, data.samples_per_client)
        features.append(means[y] + rng.normal(size=(y.size, data.num_features)).astype(np.float32))
        labels.append(np.eye(data.num_classes, dtype=np.float32)[y])
    steps = int(model.epochs)

    def play(folder: Path, round_done: Callable[[], None]) -> None:
        del folder  # all in memory
        weights: npt.NDArray[Any] = np.zeros((data.num_features + 1) * data.num_classes, np.float32)
        for _ in range(rounds):
            cohort = rng.choice(data.num_clients, config.round.clients_per_round, replace=False)
            total = np.zeros_like(weights)
            for client in cohort:
                local = _train(
                    weights, features[client], labels[client], steps=steps, lr=model.learning_rate
                )
                total += (local - weights) * len(labels[client])
            weights = weights + total / (len(cohort) * data.samples_per_client)
            round_done()

    return play


def simulation_rounds(config: Config) -> Player:
    """The simulator's run of ``config``."""

    def play(folder: Path, round_done: Callable[[], None]) -> None:
        Simulation(config, folder).run(on_round=lambda row: round_done())

    return play


def paired_ratio(config: Config, *, rounds: int, simulator_first: bool) -> tuple[float, float]:
    """The simulator's and the bare loop's seconds per round (the median of the second half
    of each run), the two taking turns round by round."""
    players = [simulation_rounds(config), bare_numpy_rounds(config, rounds=rounds)]
    if not simulator_first:
        players.reverse()
    gaps = _taking_turns(players)
    if not simulator_first:
        gaps.reverse()
    simulated, bare = (float(np.median(g[len(g) // 2 :])) for g in gaps)
    return simulated, bare


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


def seconds_to_first_round(config_path: Path, *, bytecode: Path | None = None) -> float:
    """Launch ``shoal simulate`` as a new process; time until it prints round 1.

    ``bytecode``: a folder for Python's compiled modules (``PYTHONPYCACHEPREFIX``), written
    as a user's Python writes them; None: the environment as it is (where it sets
    ``PYTHONDONTWRITEBYTECODE``, each launch compiles Shoal's own modules from source)."""
    env = dict(os.environ)
    if bytecode is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(bytecode)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "shoal", "simulate", str(config_path),
             "--rounds", "2", "--out", str(Path(folder) / "run")],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        assert process.stdout is not None
        elapsed = float("nan")
        for line in process.stdout:
            if line.split()[:2] == ["1", "fit"]:
                elapsed = time.perf_counter() - start
                break
        process.communicate()
        return elapsed


def seconds_to_first_round_compiled(config_path: Path) -> float:
    """:func:`seconds_to_first_round` as a user's second and later launches go: every module's
    bytecode compiled by a first launch (whose time is not counted)."""
    with tempfile.TemporaryDirectory() as bytecode:
        seconds_to_first_round(config_path, bytecode=Path(bytecode))  # compiles, as a first run
        return seconds_to_first_round(config_path, bytecode=Path(bytecode))


TELEMETRY_TURN_ROUNDS = 10
"""How many rounds each of a telemetry pair's two runs plays per turn. Two simulations whose
pools take turns every round (two coordinator threads, two workers) made a side task's send
(the round's measures, sent only with the telemetry on) take 0.5-0.8 ms at 100 clients and 10
a round, against 0.10-0.15 ms in a run alone or in turns of ten rounds: the woken worker ran
on the sending thread's core (with the threads and the workers pinned to separate cores the
send took 0.12-0.18 ms in turns of one round too). That charged the telemetry a cost no run
alone has. Ten rounds still pass well within the machine's spells of speed."""


def telemetry_ratio(
    path: Path, *, rounds: int, repeats: int, in_process: bool, control: bool = False
) -> tuple[float, float, list[float], list[float]]:
    """Seconds per round with the telemetry on and off, with the workload's own pool or
    ``in_process``, and the ratio of each of ``repeats`` pairs of runs. A pair's two runs
    take turns every :data:`TELEMETRY_TURN_ROUNDS` rounds (two threads handing a baton back
    and forth, only one ever running), so the rounds with the telemetry meet the machine as
    the rounds without it met it a moment before: on a shared machine whose speed drifts by
    10% from one run to the next, two runs one after the other differ by more than the
    telemetry costs. Each
    run's figure is the median of its second half's rounds; the first figures returned are
    the medians over the pairs, the last the ratio of each turn pair of the runs' second
    halves (:func:`turn_pair_ratios`). ``control``: the run "with" the telemetry has it
    off too (on in every second pair), so that the ratios show what the pairing measures of
    two identical runs, the noise against which the telemetry's cost is read."""
    timings: dict[bool, list[float]] = {True: [], False: []}
    by_turns: list[float] = []
    for repeat in range(repeats):
        order = (True, False) if repeat % 2 == 0 else (False, True)  # who goes first
        both = repeat // 2 % 2 == 1  # a control's state: off in two pairs, on in the next two
        configs = [
            _telemetry_config(
                path, rounds=rounds, enabled=both if control else with_it, in_process=in_process
            )
            for with_it in order
        ]
        players = [simulation_rounds(config) for config in configs]
        runs = dict(zip(order, _taking_turns(players, every=TELEMETRY_TURN_ROUNDS), strict=True))
        for enabled, gaps in runs.items():
            timings[enabled].append(float(np.median(gaps[len(gaps) // 2 :])))
        by_turns += turn_pair_ratios(runs[True], runs[False], every=TELEMETRY_TURN_ROUNDS)
    ratios = [on / off for on, off in zip(timings[True], timings[False], strict=True)]
    return float(np.median(timings[True])), float(np.median(timings[False])), ratios, by_turns


def turn_pair_ratios(on: list[float], off: list[float], *, every: int) -> list[float]:
    """The ratio of the median round of each turn of ``every`` rounds with the telemetry
    (``on``, seconds per round in order) to that of the turn without it next to it in time
    (``off``), over the second half of the turns (the first half makes the clients' data).
    A pair of runs gives several such ratios, each of two stretches a few tenths of a second
    apart: more samples of the same cost than the pair's one ratio, for an interval."""
    turns = min(len(on), len(off)) // every
    return [
        float(np.median(on[turn * every : (turn + 1) * every]))
        / float(np.median(off[turn * every : (turn + 1) * every]))
        for turn in range(turns // 2, turns)
    ]


def median_interval(
    values: list[float], *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap 95% interval of the median of ``values`` (seeded: the same values give the
    same interval)."""
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(data, size=(resamples, data.size)), axis=1)
    low, high = np.quantile(medians, [0.025, 0.975])
    return float(low), float(high)


def _telemetry_config(path: Path, *, rounds: int, enabled: bool, in_process: bool) -> Config:
    switch = str(enabled).lower()
    overrides = [f"run.rounds={rounds}", *(["simulation.workers=0"] if in_process else [])]
    return load_config(path, [*overrides, f"telemetry.enabled={switch}", f"drift.enabled={switch}"])


def _taking_turns(players: list[Player], *, every: int = 1) -> list[list[float]]:
    """Play the players ``every`` rounds each in turn (two threads handing a baton back and
    forth, only one ever running); each one's seconds per round (the time from being handed
    the turn, or from its round before, until its next round is done). A player that ends
    (its rounds played, or failed) is passed over from then on; the first failure is raised
    once every player has ended."""
    count = len(players)
    turns = [threading.Semaphore(0) for _ in players]
    gaps: list[list[float]] = [[] for _ in players]
    failures: list[BaseException] = []
    ended = [False] * count  # written by the one player running, before it hands over

    def next_after(index: int) -> int | None:
        following = ((index + step) % count for step in range(1, count))
        return next((other for other in following if not ended[other]), None)

    def play(index: int, player: Player, folder: Path) -> None:
        turns[index].acquire()
        started = time.perf_counter()

        def round_done() -> None:
            nonlocal started
            gaps[index].append(time.perf_counter() - started)
            following = next_after(index)
            if len(gaps[index]) % every == 0 and following is not None:
                turns[following].release()
                turns[index].acquire()
            started = time.perf_counter()

        try:
            player(folder, round_done)
        except BaseException as exc:  # the others must not wait for a turn that never comes
            failures.append(exc)
        finally:
            ended[index] = True
            following = next_after(index)
            if following is not None:
                turns[following].release()

    with tempfile.TemporaryDirectory() as folder:
        threads = [
            threading.Thread(target=play, args=(index, player, Path(folder) / f"run-{index}"))
            for index, player in enumerate(players)
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
    # the simulator and the bare loop take turns round by round (as the telemetry's pairs,
    # below): on a shared machine whose speed drifts by 10-50% from one minute to the next,
    # each simulated round is compared with the bare loop's round a moment before or after
    # it, and the median of the sittings' ratios is the figure
    pooled: list[float] = []
    serials: list[float] = []
    baselines: list[float] = []
    ratios: list[float] = []
    serial_ratios: list[float] = []
    for sitting in range(sittings):
        first = sitting % 2 == 0  # who goes first alternates
        per_round, baseline = paired_ratio(config, rounds=rounds, simulator_first=first)
        pooled.append(per_round)
        baselines.append(baseline)
        ratios.append(per_round / baseline)
        serial, baseline = paired_ratio(serial_config, rounds=rounds, simulator_first=first)
        serials.append(serial)
        serial_ratios.append(serial / baseline)
    _, whole_run, first_round = simulator_seconds_per_round(config)  # alone: the launch
    with_telemetry, without_telemetry, telemetry_ratios, telemetry_turns = telemetry_ratio(
        path, rounds=rounds, repeats=repeats, in_process=False
    )
    with_in_process, without_in_process, in_process_ratios, in_process_turns = telemetry_ratio(
        path, rounds=rounds, repeats=repeats, in_process=True
    )
    return {
        "benchmark": "simulation_overhead",
        "workload": name,
        "clients": config.data.num_clients,
        "clients_per_round": config.round.clients_per_round,
        "rounds": rounds,
        "sittings": sittings,
        "seconds_per_round": round(float(np.median(pooled)), 5),
        "seconds_per_round_including_data_generation": round(whole_run, 5),
        "seconds_per_round_in_process": round(float(np.median(serials)), 5),
        "bare_numpy_seconds_per_round": round(float(np.median(baselines)), 5),
        "ratio_to_bare_numpy": round(float(np.median(ratios)), 3),
        "ratio_to_bare_numpy_of_each_sitting": [round(ratio, 3) for ratio in ratios],
        "ratio_in_process_to_bare_numpy": round(float(np.median(serial_ratios)), 3),
        "ratio_in_process_of_each_sitting": [round(ratio, 3) for ratio in serial_ratios],
        "seconds_to_first_round_in_process": round(first_round, 3),
        "seconds_per_round_with_telemetry": round(with_telemetry, 5),
        "seconds_per_round_without_telemetry": round(without_telemetry, 5),
        "telemetry_ratio": round(float(np.median(telemetry_ratios)), 4),
        "telemetry_ratio_of_each_pair": [round(ratio, 4) for ratio in telemetry_ratios],
        **_by_turns("telemetry_ratio", telemetry_turns),
        "seconds_per_round_in_process_with_telemetry": round(with_in_process, 5),
        "seconds_per_round_in_process_without_telemetry": round(without_in_process, 5),
        "telemetry_ratio_in_process": round(float(np.median(in_process_ratios)), 4),
        "telemetry_ratio_in_process_of_each_pair": [round(r, 4) for r in in_process_ratios],
        **_by_turns("telemetry_ratio_in_process", in_process_turns),
        "seconds_from_launch_to_first_round": round(seconds_to_first_round_compiled(path), 3),
        "seconds_from_launch_to_first_round_compiling": round(seconds_to_first_round(path), 3),
    }


def _by_turns(prefix: str, ratios: list[float]) -> dict[str, Any]:
    """The turn pairs' median ratio, its bootstrap 95% interval and their count."""
    if not ratios:
        return {}
    low, high = median_interval(ratios)
    return {
        f"{prefix}_by_turns": round(float(np.median(ratios)), 4),
        f"{prefix}_by_turns_interval": [round(low, 4), round(high, 4)],
        f"{prefix}_turn_pairs": len(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--workloads", nargs="+", default=["overhead-100", "overhead-1000"])
    parser.add_argument("--repeats", type=int, default=5, help="telemetry on/off pairs")
    parser.add_argument(
        "--sittings", type=int, default=3, help="simulator and bare loop pairs, each way"
    )
    args = parser.parse_args()
    for name in args.workloads:
        figures = measure(name, rounds=args.rounds, repeats=args.repeats, sittings=args.sittings)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
