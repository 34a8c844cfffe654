"""docs/federated-preprocessing.md's client of one's own runs both passes as the page says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import shoal
from shoal.client.app import ClientContext
from shoal.preprocessing import read_statistics
from support.documents import ROOT, fenced_blocks

PAGE = ROOT / "docs" / "federated-preprocessing.md"
SCALES = np.array([5000.0, 1.0, 0.01])


def my_client_class() -> Any:
    (block,) = fenced_blocks(PAGE.read_text(), "python")
    namespace: dict[str, Any] = {}
    exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace["MyClient"]


def test_the_pages_client_counts_its_records_then_trains_standardized(tmp_path: Path) -> None:
    my_client = my_client_class()

    def client_fn(context: ClientContext) -> Any:
        rng = np.random.default_rng(context.partition_index)
        z = rng.normal(size=(200, 3))
        return my_client((z * SCALES + SCALES).astype(np.float32), (z @ [1, -1, 1] > 0).astype(int))

    job: dict[str, Any] = {
        "run": {"name": "mine", "rounds": 1},
        "data": {"num_clients": 3},
        "round": {"clients_per_round": 3, "over_selection": 1.0, "quorum": 1.0},
        "evaluation": {"every": 0},
        "simulation": {"workers": 0},
        "statistics": {
            "enabled": True,
            "low": (-4 * SCALES).tolist(),
            "high": (6 * SCALES).tolist(),
        },
    }
    shoal.simulate(job, client_app=client_fn, out=tmp_path / "stats")
    statistics, _ = read_statistics(tmp_path / "stats")
    pooled = np.concatenate(
        [client_fn(ClientContext(f"c{i}", i, 3)).local_features() for i in range(3)]
    ).astype(np.float64)
    np.testing.assert_allclose(statistics.mean, pooled.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(statistics.std, pooled.std(axis=0), rtol=1e-4)

    job.pop("statistics")
    job["run"]["rounds"] = 10
    job["evaluation"] = {"every": 10, "clients": 3, "centralized": False}
    job["client"] = {"epochs": 1, "batch_size": 32, "learning_rate": 0.5}
    job["preprocessing"] = {"statistics": str(tmp_path / "stats")}
    trained = shoal.simulate(job, client_app=client_fn, out=tmp_path / "train")
    assert trained.summary["final_federated_accuracy"] >= 0.9
