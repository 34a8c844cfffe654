"""A coordinator job for tests that serve it on 127.0.0.1 to in-process digits clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def network_job(
    tmp_path: Path,
    *,
    run_id: str,
    token: str,
    clients: int,
    per_round: int,
    **sections: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """The job's sections: digits, FedAvg, fast retries; ``sections`` are merged over them."""
    base: dict[str, dict[str, Any]] = {
        "data": {"num_clients": clients},
        "round": {"clients_per_round": per_round, "over_selection": 1.0},
        "client": {"epochs": 1, "batch_size": 16, "learning_rate": 0.2},
        "evaluation": {"every": 0},
        "coordinator": {
            "listen": "127.0.0.1:0",
            "run_id": run_id,
            "state_dir": str(tmp_path / "state"),
            "enrollment_tokens": [token],
            "retry_after_s": 0.05,
            "grace_s": 0,
            "app": "shoal.apps.digits:make_client",
        },
    }
    for name, section in sections.items():
        base[name] = base.get(name, {}) | section
    return base
