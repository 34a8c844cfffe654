"""A metrics row with every figure of the telemetry contract, for tests of its consumers."""

from __future__ import annotations

from typing import Any


def contract_row(**changes: Any) -> dict[str, Any]:
    """An evaluate row with every figure of the telemetry contract."""
    row: dict[str, Any] = {
        "round": 4,
        "phase": "evaluate",
        "committed": True,
        "model_version": 3,
        "selected": 10,
        "reported": 8,
        "dropped": 2,
        "accuracy": 0.9,
        "loss": 0.3,
        "drop_rate": 0.2,
        "drops_by_stage": {"evaluate": 2},
        "drops_by_reason": {"deadline": 1, "failed:oom": 1},
        "rtt_p50_s": 1.0,
        "rtt_p90_s": 2.0,
        "rtt_p99_s": 3.0,
        "train_p50_s": 0.5,
        "train_p90_s": 1.5,
        "train_p99_s": 2.5,
        "deadline_share_p50": 0.1,
        "deadline_share_p90": 0.2,
        "deadline_share_p99": 0.3,
        "straggler_index": 0.2,
        "divergence_median": 0.01,
        "divergence_p90": 0.02,
        "divergence_max": 0.05,
        "divergence_flagged": 1,
        "fairness": {
            "phone": {"population_share": 0.7, "participation_share": 0.6, "accuracy": 0.88},
            "tablet": {"population_share": 0.3, "participation_share": 0.4, "accuracy": None},
        },
        "fairness_gap": 0.04,
        "participation_gap": 0.1,
        "bytes_up": 800,
        "bytes_down": 1000,
        "bytes_up_per_client": 100.0,
        "bytes_down_per_client": 100.0,
        "epsilon": 1.5,
        "delta": 1e-5,
        "drift_clusters": 2,
        "drift_separation": 0.7,
        "drift_bimodal": True,
        "cluster_sizes": {"0": 5, "1": 3},
        "cluster_accuracy": {"0": 0.9, "1": 0.8},
    }
    row.update(changes)
    return row
