"""Benchmark of the update policy: Rego decisions per second, against the same checks in Python.

For a round of N updates (about one in twenty breaking a rule: a huge norm,
a claimed ``2**63 - 1`` examples, a suspended client, a spent budget...),
times the compiled default policy deciding on all of them in one query
(``PolicyEngine.decide``: the input built from the facts, the query, the
denials read back), the same one update at a time (a batch of one per
query), and the default policy's seven checks written in Python over the
same facts, best of ``--repeats`` each, in the same process. Both give the
same decisions (checked before timing). Then the same round with no update
breaking any rule, the usual case, in which each rule's guard skips it.
Prints one JSON object per N.

    python benchmarks/policy.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

from shoal.governance import PolicyBounds, PolicyEngine, UpdateFacts

BOUNDS = PolicyBounds()


def round_of(count: int, *, faulty: bool = True) -> list[UpdateFacts]:
    """``count`` updates of a round; with ``faulty``, every twentieth breaks one rule, in
    turn."""
    faults: list[dict[str, object]] = [
        {"l2_norm": 1.8e31},
        {"num_examples": 2**63 - 1},
        {"status": "suspended"},
        {"remaining_epsilon": 0.0},
        {"relative_l2_norm": 40.0},
        {"signature": "none"},
        {"version_problems": ("app version 1.0 is below the minimum 2.0",)},
    ]
    updates = []
    for index in range(count):
        facts: dict[str, object] = {
            "client_id": f"client-{index:05d}",
            "device_class": "phone",
            "app_version": "2.1.0",
            "signature": "verified",
            "remaining_epsilon": 3.5,
            "l2_norm": 1.0 + (index % 7) / 10,
            "relative_l2_norm": 0.8 + (index % 5) / 10,
            "num_examples": 100 + index % 50,
        }
        if faulty and index % 20 == 19:
            facts.update(faults[(index // 20) % len(faults)])
        updates.append(UpdateFacts(**facts))  # type: ignore[arg-type]
    return updates


def python_decide(batch: Sequence[UpdateFacts]) -> list[list[str]]:
    """The default policy's checks, written in Python: the codes that deny each update."""
    decisions = []
    for facts in batch:
        codes = []
        if facts.signature not in ("verified", "in_process"):
            codes.append("signature_unverified")
        if facts.status != "active":
            codes.append("client_not_active")
        if facts.version_problems:
            codes.append("versions_incompatible")
        if facts.remaining_epsilon is not None and facts.remaining_epsilon <= 0:
            codes.append("privacy_budget_spent")
        if facts.l2_norm is not None and facts.l2_norm > BOUNDS.max_l2_norm:
            codes.append("l2_norm_above_bound")
        ratio = facts.relative_l2_norm
        if ratio is not None and ratio > BOUNDS.max_relative_l2_norm:
            codes.append("relative_l2_norm_above_bound")
        if facts.num_examples is not None and facts.num_examples > BOUNDS.max_examples:
            codes.append("examples_above_cap")
        decisions.append(sorted(codes))
    return decisions


def rego_codes(engine: PolicyEngine, batch: Sequence[UpdateFacts]) -> list[list[str]]:
    return [[reason.code for reason in d.reasons] for d in engine.decide(1, batch)]


def best_seconds(function: Callable[[], object], *, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def measure(engine: PolicyEngine, count: int, *, repeats: int) -> dict[str, object]:
    batch = round_of(count)
    if rego_codes(engine, batch) != python_decide(batch):
        raise SystemExit("the Rego policy and the Python checks disagree")
    batched = best_seconds(lambda: engine.decide(1, batch), repeats=repeats)
    singles = batch[: min(count, 500)]  # one query each: a sample is enough to time
    single = best_seconds(
        lambda: [engine.decide(1, [facts]) for facts in singles], repeats=repeats
    ) * (count / len(singles))
    python = best_seconds(lambda: python_decide(batch), repeats=repeats)
    clean = round_of(count, faulty=False)  # the usual round: each rule's guard skips it
    if any(rego_codes(engine, clean)):
        raise SystemExit("the Rego policy denies a clean round")
    clean_batched = best_seconds(lambda: engine.decide(1, clean), repeats=repeats)
    return {
        "updates": count,
        "denied": sum(1 for codes in python_decide(batch) if codes),
        "rego_batch_decisions_per_s": round(count / batched),
        "rego_single_decisions_per_s": round(count / single),
        "python_decisions_per_s": round(count / python),
        "python_over_rego_batch": round(batched / python, 1),
        "rego_batch_over_single": round(single / batched, 2),
        "rego_clean_batch_decisions_per_s": round(count / clean_batched),
        "rego_clean_over_faulty_batch": round(batched / clean_batched, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    engine = PolicyEngine(bounds=BOUNDS)
    for count in arguments.updates:
        print(json.dumps(measure(engine, count, repeats=arguments.repeats)), flush=True)


if __name__ == "__main__":
    main()
