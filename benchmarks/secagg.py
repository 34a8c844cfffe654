"""Benchmark: one SecAgg+ round of Shoal and one of Flower, side by side, each party in one process.

Each Shoal client runs the real protocol (X25519, HKDF, AES-GCM shares,
AES-CTR masks, Shamir sharing, quantization, and the consistency check:
Ed25519 signatures over the survivor set) through `shoal.secure.loopback`;
the clients' identity keys are made before the round, as enrollment would.
The ``--dropout`` fraction of the clients vanishes
after sharing its keys (the costly case: the server rebuilds their pairwise
masks from shares), and the masked-input stage then closes at its deadline,
in virtual time.

Reported for Shoal: the mean compute per client over the stages, the
server's compute, the round's wall time with all of it on one core
("round_s"), the round's critical path if each client had its own device
("parallel_s": the server plus the slowest client), the bytes each client
sends and receives, and the stages that ran. The baseline, measured in the
same run, is the plaintext weighted mean of the same updates.

Flower's SecAgg+ runs in the same invocation: ``benchmarks/flower/secagg_round.py``
in Flower's own virtual environment (see ``benchmarks/flower_venv.py``),
its real workflow and client mod with every party in one process, the
same arrangement. Flower's ``num_shares`` counts the client itself, so
Shoal's degree k meets Flower's k + 1 shares: 7 shares are degree 6. The
ratio ``speedup_vs_flower`` divides Flower's round without its message codec
("flower_s") by Shoal's whole round, codec included: it never flatters
Shoal. ``--flower-simulation`` also times Flower's round in its own
simulation engine (Ray actors, one per core, and the engine's polling), as
its users run it: "flower_simulation_s" and its own ratio. Without
``--clients`` the three settings compared are 20 clients with 7 shares, 20
with a complete graph and 50 with a complete graph.

    python benchmarks/secagg.py                      # the three settings, beside Flower
    python benchmarks/secagg.py --clients 20 --degree 6 --dropout 0.1 --skip-flower
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np

from flower_venv import FlowerUnavailable, add_flower_arguments, flower_python, run_flower
from shoal.secure.client import Contribution
from shoal.secure.consistency import IdentityKey
from shoal.secure.graph import default_degree
from shoal.secure.loopback import run_loopback_round
from shoal.secure.messages import Stage
from shoal.secure.server import StageDeadlines, SumReady

DEADLINES = StageDeadlines(advertise_keys=10, share_keys=10, masked_input=60, unmask=10)
FLOWER_SETTINGS = ((20, 6), (20, 19), (50, 49))  # (clients, degree): 7 shares, complete, complete


def contributions(clients: int, params: int, seed: int) -> dict[str, Contribution]:
    rng = np.random.default_rng(seed)
    return {
        f"client-{i:05d}": Contribution(
            rng.normal(0, 0.1, params).astype(np.float32), int(rng.integers(10, 500)), 0.5
        )
        for i in range(clients)
    }


def plaintext_mean(inputs: dict[str, Contribution]) -> tuple[np.ndarray, float]:
    began = time.perf_counter()
    weights = np.array([c.num_examples for c in inputs.values()], dtype=np.float32)
    total = np.zeros_like(next(iter(inputs.values())).update)
    for weight, contribution in zip(weights, inputs.values(), strict=True):
        total += weight * contribution.update
    return total / weights.sum(), time.perf_counter() - began


def one_round(args: argparse.Namespace, degree: int, seed: int) -> dict[str, Any]:
    inputs = contributions(args.clients, args.params, seed)
    gone = sorted(inputs)[: round(args.dropout * args.clients)]
    identities = {client: IdentityKey.generate() for client in inputs}  # enrolled before
    began = time.perf_counter()
    outcome = run_loopback_round(
        inputs,
        degree=degree,
        dropouts=dict.fromkeys(gone, Stage.MASKED_INPUT),
        deadlines=DEADLINES,
        seed=seed,
        identities=identities,
    )
    round_s = time.perf_counter() - began
    if not isinstance(outcome.result, SumReady):
        raise SystemExit(f"the round aborted: {outcome.result.reason}")
    result = outcome.result.result
    survivors = {client: inputs[client] for client in result.contributors}
    expected, plain_s = plaintext_mean(survivors)
    client_seconds = np.array(list(outcome.client_seconds.values()))
    return {
        "round_s": round_s,
        "client_s": float(client_seconds.mean()),
        "client_max_s": float(client_seconds.max()),
        "server_s": outcome.server_seconds,
        "parallel_s": outcome.server_seconds + float(client_seconds.max()),
        "plain_s": plain_s,
        "bytes_sent": float(np.mean([outcome.bytes_sent[c] for c in result.contributors])),
        "bytes_received": float(np.mean([outcome.bytes_received[c] for c in result.contributors])),
        "max_error": float(np.max(np.abs(result.decoded.mean() - expected))),
        "recovered": len(result.recovered),
        "masked_input_closed_at_s": outcome.closed_at["masked_input"],
        "stages": list(outcome.closed_at),
    }


def flower_side(args: argparse.Namespace, degree: int, python: Any) -> dict[str, Any]:
    """Flower's figures for this setting, or why there are none."""
    shares = degree + 1
    if python is None:
        return {"flower_skipped": "--skip-flower"}
    if args.dropout > 0:
        return {"flower_skipped": "Flower's side is measured without dropouts"}
    if shares < 3 or (shares % 2 == 0 and shares != args.clients):
        # Flower's ring takes an odd number of shares (it adds one to an even count)
        return {"flower_skipped": f"Flower cannot run {shares} shares of {args.clients} clients"}
    report = run_flower(
        python,
        "secagg_round.py",
        ["--clients", str(args.clients), "--shares", str(shares), "--params", str(args.params),
         "--repeats", str(args.flower_repeats)],
    )  # fmt: skip
    figures: dict[str, Any] = {}
    if args.flower_simulation:  # as a Flower user runs it: its engine, Ray actors, polling
        simulated = run_flower(
            python,
            "secagg_round.py",
            ["--engine", "simulation", "--clients", str(args.clients), "--shares", str(shares),
             "--params", str(args.params), "--repeats", str(args.flower_repeats)],
        )  # fmt: skip
        figures = {
            "flower_simulation_s": simulated["round_s"],
            "flower_simulation_rounds_s": simulated["rounds_s"],
        }
    return {
        **figures,
        "flower_version": report["flower_version"],
        "flower_shares": shares,
        "flower_round_s": report["round_s"],
        "flower_codec_s": report["codec_s"],
        "flower_s": round(report["round_s"] - report["codec_s"], 6),
        "flower_rounds_s": report["rounds_s"],
        "flower_bytes_sent": report["bytes_sent"],
        "flower_bytes_received": report["bytes_received"],
        "flower_max_error": report["max_error"],
    }


def measure(args: argparse.Namespace, python: Any) -> dict[str, Any]:
    degree = min(args.degree, args.clients - 1) if args.clients > 1 else 1
    # Shoal's rounds before and after Flower's, so that neither side gets only a quiet spell
    first = [one_round(args, degree, seed) for seed in range(args.repeats // 2)]
    flower = flower_side(args, degree, python)
    runs = first + [one_round(args, degree, seed) for seed in range(len(first), args.repeats)]
    best = min(runs, key=lambda run: run["round_s"])
    stages = best.pop("stages")
    report: dict[str, Any] = {
        "benchmark": "secagg",
        "clients": args.clients,
        "degree": degree,
        "default_degree": default_degree(args.clients),
        "params": args.params,
        "dropout": args.dropout,
        "repeats": args.repeats,
        "stages": stages,
        **{key: round(value, 6) for key, value in best.items()},
        "rounds_s": [round(run["round_s"], 6) for run in runs],
        "bytes_per_client": round(best["bytes_sent"] + best["bytes_received"]),
        "upload_ratio_to_plaintext": round(best["bytes_sent"] / (4 * args.params), 3),
        "ratio_to_plaintext_mean": round(best["round_s"] / best["plain_s"], 1),
        "masked_input_closed_at_deadline": best["masked_input_closed_at_s"]
        >= DEADLINES.masked_input,
        **flower,
    }
    if "flower_s" in flower:
        report["speedup_vs_flower"] = round(flower["flower_s"] / best["round_s"], 1)
        report["speedup_vs_flower_with_codec"] = round(
            flower["flower_round_s"] / best["round_s"], 1
        )
    if "flower_simulation_s" in flower:
        report["speedup_vs_flower_simulation"] = round(
            flower["flower_simulation_s"] / best["round_s"], 1
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=None, help="default: Flower's three")
    parser.add_argument("--degree", type=int, default=None, help="default: about 2 log2 n")
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=6, help="Shoal's rounds; the best counts")
    parser.add_argument("--flower-repeats", type=int, default=3, help="Flower's rounds")
    parser.add_argument(
        "--flower-simulation",
        action="store_true",
        help="also time Flower in its simulation engine (Ray), as its users run it",
    )
    add_flower_arguments(parser)
    args = parser.parse_args()
    if args.repeats < 1 or args.flower_repeats < 1:
        parser.error("--repeats and --flower-repeats must be at least 1")
    if args.clients is None:
        settings = list(FLOWER_SETTINGS) if args.degree is None else [(20, args.degree)]
    else:
        degree = args.degree
        if degree is None:
            degree = 2 * math.ceil(math.log2(args.clients)) if args.clients > 1 else 1
        settings = [(args.clients, degree)]
    try:
        python = flower_python(args)
        for clients, degree in settings:
            setting = argparse.Namespace(**{**vars(args), "clients": clients, "degree": degree})
            print(json.dumps(measure(setting, python)), flush=True)
    except FlowerUnavailable as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
