"""Benchmark: how each aggregation rule holds up against simulated attackers, on digits.

Every attack kind of ``[[attack]]`` at 10%, 20% and 30% of the population
(attacking from round 1), against plain FedAvg, the coordinate-wise median,
the trimmed mean, Multi-Krum, and FedAvg with the default update policy
(and the poisoned-model playbook where the config has a ``[playbook]``
section; else the column says "playbook pending"). The baseline, measured
in the same run, is each rule with the same settings and no attacker.
Trimmed mean and Multi-Krum are told the attacker share plus a margin of
0.1 (a round may draw more attackers than the share): ``trim_ratio`` =
share + 0.1 and ``num_byzantine`` = ceil((share + 0.1) * clients_per_round).

Prints one JSON object per cell: the final central accuracy, the clean
run's, their difference in points, and for a backdoor its success rate.
``--workers`` runs that many cells at once (each simulation in one process).

    python benchmarks/robustness.py --workers 2
    python benchmarks/robustness.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.apps.builtin import scenario_of
from shoal.config import AttackEntry, Config, apply_overrides, parse_config
from shoal.simulation.attacks import backdoor_success_rate
from shoal.simulation.runner import Simulation, final_parameters

KINDS = ("sign_flip", "scaling", "gaussian_noise", "label_flip", "backdoor", "free_rider")
SHARES = (0.1, 0.2, 0.3)
RULES = ("fedavg", "median", "trimmed_mean", "multikrum", "fedavg+policy")
MARGIN = 0.1
SCENARIO = [
    "run.rounds=40",
    "data.dataset='digits'",
    "data.num_clients=100",
    "data.partition='iid'",
    "model.kind='mlp'",
    "model.hidden=32",
    "round.clients_per_round=20",
    "round.over_selection=1.0",
    "round.quorum=0.5",
    "evaluation.every=0",
    "client.epochs=5",
    "client.batch_size=8",
    "client.learning_rate=0.2",
    "simulation.workers=0",
]
QUICK = ["run.rounds=15", "data.num_clients=50", "round.clients_per_round=10"]


@dataclass(frozen=True, slots=True)
class Cell:
    """One run of the table: a rule against an attack (kind None: the clean baseline)."""

    rule: str
    share: float
    kind: str | None
    scenario: tuple[str, ...]


def has_playbook() -> bool:
    """Whether this Shoal's config has the poisoned-model playbook (``[playbook]``)."""
    return "playbook" in Config.model_fields


def rule_overrides(rule: str, share: float, *, per_round: int) -> list[str]:
    """The strategy settings of ``rule`` for an attacker ``share`` (see the module docstring)."""
    if rule == "fedavg+policy":
        return ["strategy.name='fedavg'", *(["playbook.enabled=true"] if has_playbook() else [])]
    # the other columns are the rules alone: no policy and no playbook (both on by default)
    alone = ["policy.enabled=false", *(["playbook.enabled=false"] if has_playbook() else [])]
    if rule == "median":
        return ["strategy.name='fedmedian'", *alone]
    if rule == "trimmed_mean":
        return [
            "strategy.name='fedtrimmedavg'",
            f"strategy.trim_ratio={share + MARGIN:.2f}",
            *alone,
        ]
    if rule == "multikrum":
        byzantine = math.ceil(round((share + MARGIN) * per_round, 6))
        return ["strategy.name='multikrum'", f"strategy.num_byzantine={byzantine}", *alone]
    return ["strategy.name='fedavg'", *alone]


def config_of(cell: Cell) -> Config:
    """The run of ``cell``: the scenario, the rule's settings, and its ``[[attack]]``."""
    data = apply_overrides({}, cell.scenario)
    per_round = int(data["round"]["clients_per_round"])
    data = apply_overrides(data, rule_overrides(cell.rule, cell.share, per_round=per_round))
    if cell.kind is not None:
        data["attack"] = [{"kind": cell.kind, "fraction": cell.share}]
    return parse_config(data)


def run_cell(cell: Cell) -> dict[str, Any]:
    """The final figures of one cell's run."""
    logging.getLogger("shoal").setLevel(logging.ERROR)  # each denied update logs a warning
    config = config_of(cell)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = Simulation(config, Path(folder) / "run").run()
        rate = summary.get("final_backdoor_success_rate")
        if cell.kind is None:  # the trigger on the clean model: what a backdoor starts from
            scenario = scenario_of(config)
            features, labels = scenario.central_test_data()
            rate = backdoor_success_rate(
                final_parameters(Path(folder) / "run"),
                features,
                labels,
                entry=AttackEntry(kind="backdoor", fraction=0.1),
                probabilities=scenario.probabilities,
            )
    return {
        "accuracy": summary["final_accuracy"],
        "backdoor_success_rate": rate,
        "rounds_completed": summary["rounds_completed"],
    }


def cells(
    kinds: tuple[str, ...],
    shares: tuple[float, ...],
    rules: tuple[str, ...],
    scenario: tuple[str, ...],
) -> Iterator[Cell]:
    for share in shares:
        for rule in rules:
            yield Cell(rule, share, None, scenario)
            for kind in kinds:
                yield Cell(rule, share, kind, scenario)


def baseline_key(cell: Cell) -> tuple[str, ...]:
    """Cells with the same rule settings share one clean baseline."""
    per_round = int(apply_overrides({}, cell.scenario)["round"]["clients_per_round"])
    return tuple(rule_overrides(cell.rule, cell.share, per_round=per_round))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="cells run at once")
    parser.add_argument("--quick", action="store_true", help="a small subset, fast")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args()
    scenario = tuple(SCENARIO + (QUICK if args.quick else []))
    kinds = ("sign_flip", "backdoor") if args.quick else tuple(args.kinds)
    shares = (0.2,) if args.quick else SHARES
    rules = ("fedavg", "median") if args.quick else RULES
    unique: dict[tuple[Any, ...], Cell] = {}
    for cell in cells(kinds, shares, rules, scenario):
        key = (baseline_key(cell), cell.kind, cell.share if cell.kind else None)
        unique.setdefault(key, cell)
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        results = dict(zip(unique, pool.map(run_cell, unique.values()), strict=True))
    for key, cell in unique.items():
        if cell.kind is None:
            continue
        clean = results[(baseline_key(cell), None, None)]
        print(json.dumps(_line(cell, results[key], clean)))


def _line(cell: Cell, result: dict[str, Any], clean: dict[str, Any]) -> dict[str, Any]:
    accuracy, baseline = result["accuracy"], clean["accuracy"]
    line: dict[str, Any] = {
        "benchmark": "robustness",
        "attack": cell.kind,
        "attackers": cell.share,
        "rule": cell.rule,
        "accuracy": round(accuracy, 4),
        "clean_accuracy": round(baseline, 4),
        "difference_points": round(100 * (accuracy - baseline), 1),
        "ratio_to_clean": round(accuracy / baseline, 4),
    }
    if cell.kind == "backdoor":
        line["backdoor_success_rate"] = round(result["backdoor_success_rate"], 4)
        line["clean_backdoor_success_rate"] = round(clean["backdoor_success_rate"], 4)
    if cell.rule == "fedavg+policy" and not has_playbook():
        line["note"] = "playbook pending: default policy only"
    if result["rounds_completed"] < clean["rounds_completed"]:
        line["rounds_completed"] = result["rounds_completed"]
    return line


if __name__ == "__main__":
    main()
