"""A coordinator job for tests that serve it on 127.0.0.1 to in-process digits clients."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shoal.apps import client_app
from shoal.client.api import Client
from shoal.client.app import ClientContext
from shoal.config import Config, apply_overrides, parse_config


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
        "run": {"name": run_id},  # the coordinator's model is named by the run
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
            "linger_s": 0,
        },
    }
    for name, section in sections.items():
        base[name] = base.get(name, {}) | section
    return base


def digits_client(index: int, clients: int) -> Client:
    """Client ``index`` of ``clients`` of the built-in app on digits, an IID split."""
    config = bare_config(
        [
            f"data.num_clients={clients}",
            f"round.clients_per_round={min(clients, 10)}",
            "data.partition='iid'",
        ],
    )
    context = ClientContext(
        client_id=f"client-{index}", partition_index=index, num_partitions=clients, config=config
    )
    return client_app(context)


def bare_config(overrides: Iterable[str] = ()) -> Config:
    """Every section's defaults (not the embedded default job) with ``overrides``."""
    return parse_config(apply_overrides({}, overrides))
