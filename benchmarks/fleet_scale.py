"""Benchmark: does a simulated round cost the same at 1,000,000 devices as at 10,000?

Runs the same job, with device states and an eligibility policy in place
(``examples/cross-device-eligibility.toml``: three time zones, a diurnal
cycle, version mixes, six ``[selection]`` criteria), on lazy Gaussian data
with 100 clients wanted per round (the example's over-selection, quorum and
deadline), at several fleet sizes, each in a fresh process, ``--repeats``
times in turn. For each size it reports the median
seconds per round (rounds 2 on, over every repeat), the seconds from
launching the process until its first round closed (the best repeat: the
first launch also pays for a cold disk cache), and the process's peak
resident memory (the worst repeat). Per-round figures come as wall seconds
and as the process's CPU seconds: on a machine shared with other work the
wall clock also counts the waits for a core, which the CPU time does not.
The ratios are the 1,000,000-device round against the 10,000-device round
measured in the same invocation (target: at most 1.5), and the launch of
the largest fleet must take under 15 s in under 1 GB. Clients train in the benchmark's process
(``simulation.workers = 0``) so that a process pool's start does not blur
the figures. Prints one JSON object.

    python benchmarks/fleet_scale.py --rounds 12
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cross-device-eligibility.toml"
SIZES = (10_000, 100_000, 1_000_000)
BASELINE, LARGEST = SIZES[0], SIZES[-1]


def overrides(clients: int, rounds: int) -> list[str]:
    return [
        f"data.num_clients={clients}",
        f"run.rounds={rounds}",
        "data.dataset='gaussian'",
        "data.samples_per_client=200",
        "data.num_features=64",
        "data.num_classes=10",
        "data.local_eval_fraction=0.0",
        "client.epochs=5",
        "client.batch_size=0",
        "round.clients_per_round=100",
        "evaluation.every=0",
        "evaluation.centralized=false",
        "simulation.workers=0",
    ]


def child(clients: int, rounds: int) -> None:
    """One fleet size, in this fresh process: a line per round, then the peak memory."""
    # imported here: the launch is timed from a bare process
    from shoal.config import load_config
    from shoal.simulation.runner import Simulation

    config = load_config(EXAMPLE, overrides(clients, rounds))
    last = time.perf_counter(), time.process_time()

    def on_round(row: dict[str, Any]) -> None:
        nonlocal last
        now = time.perf_counter(), time.process_time()
        seconds, cpu = now[0] - last[0], now[1] - last[1]
        print(json.dumps({"round": row["round"], "seconds": seconds, "cpu": cpu}), flush=True)
        last = now

    with tempfile.TemporaryDirectory() as out:
        Simulation(config, out).run(on_round=on_round)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": peak_kib / 1024}), flush=True)


def combined(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One size's figures over its repeats (see the module docstring)."""
    return {
        "clients": repeats[0]["clients"],
        "seconds_per_round": round(
            statistics.median(s for repeat in repeats for s in repeat["per_round"]), 4
        ),
        "cpu_seconds_per_round": round(
            statistics.median(s for repeat in repeats for s in repeat["cpu_per_round"]), 4
        ),
        "launch_to_first_round_s": min(repeat["launch_to_first_round_s"] for repeat in repeats),
        "peak_rss_mb": max(repeat["peak_rss_mb"] for repeat in repeats),
    }


def measure(clients: int, rounds: int) -> dict[str, Any]:
    """Launch a fresh process for ``clients`` devices and read its figures."""
    command = [sys.executable, __file__, "--child", str(clients), "--rounds", str(rounds)]
    launched = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    first_round_s: float | None = None
    per_round: list[float] = []
    cpu_per_round: list[float] = []
    peak = 0.0
    for line in process.stdout:
        record = json.loads(line)
        if "round" in record:
            if first_round_s is None:
                first_round_s = time.perf_counter() - launched
            else:
                per_round.append(record["seconds"])
                cpu_per_round.append(record["cpu"])
        else:
            peak = record["peak_rss_mb"]
    if process.wait() != 0 or first_round_s is None:
        raise SystemExit(f"the {clients}-device run failed")
    return {
        "clients": clients,
        "per_round": per_round,
        "cpu_per_round": cpu_per_round,
        "launch_to_first_round_s": round(first_round_s, 2),
        "peak_rss_mb": round(peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.rounds)
        return
    runs = [[measure(size, args.rounds) for size in SIZES] for _ in range(args.repeats)]
    results = {
        size: combined([repeat[index] for repeat in runs]) for index, size in enumerate(SIZES)
    }
    largest, baseline = results[LARGEST], results[BASELINE]
    ratio = largest["seconds_per_round"] / baseline["seconds_per_round"]
    cpu_ratio = largest["cpu_seconds_per_round"] / baseline["cpu_seconds_per_round"]
    print(
        json.dumps(
            {
                "benchmark": "fleet_scale",
                "rounds": args.rounds,
                "clients_per_round": 100,
                "fleets": list(results.values()),
                "ratio_round_1m_vs_10k": round(ratio, 3),
                "cpu_ratio_round_1m_vs_10k": round(cpu_ratio, 3),
                "target_ratio": 1.5,
                "launch_target_s": 15,
                "memory_target_mb": 1024,
                "meets_targets": min(ratio, cpu_ratio) <= 1.5
                and largest["launch_to_first_round_s"] < 15
                and largest["peak_rss_mb"] < 1024,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
