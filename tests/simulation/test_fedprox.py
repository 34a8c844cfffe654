"""FedProx's qualitative result: with 90% stragglers, partial work plus mu beats dropping them.

Li et al. 2020, Figure 1: on Synthetic(1, 1) with 90% of the selected
devices only able to do part of their local epochs, FedProx (mu = 1,
aggregating the partial work) reaches a far lower training loss than FedAvg
(which drops the stragglers) after the same number of rounds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shoal.apps.builtin import DataScenario
from shoal.config import Config, load_config
from shoal.simulation.runner import Simulation, final_parameters

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fedprox-synthetic.toml"
FEDAVG = ["strategy.name=fedavg", "strategy.proximal_mu=0", "devices.straggler_policy=drop"]


def training_loss(config: Config, folder: Path) -> float:
    """The global model's loss on every device's training data."""
    scenario = DataScenario(config)
    parts = [scenario.local_data(client) for client in scenario.client_ids]
    features = np.concatenate([part.train_x for part in parts])
    labels = np.concatenate([part.train_y for part in parts])
    loss, _ = scenario.model.evaluate(final_parameters(folder).vector, features, labels)
    return float(loss)


@pytest.mark.parametrize("seed", [0, 1])
def test_fedprox_beats_fedavg_with_90_percent_stragglers(tmp_path: Path, seed: int) -> None:
    common = [
        f"run.seed={seed}",
        "run.rounds=10",
        "data.max_samples_per_client=200",
        "simulation.workers=0",
    ]
    fedprox = load_config(EXAMPLE, common)
    fedavg = load_config(EXAMPLE, [*common, *FEDAVG])
    assert fedprox.strategy.proximal_mu == 1.0 and fedprox.devices.straggler_fraction == 0.9
    prox_summary = Simulation(fedprox, tmp_path / "fedprox").run()
    avg_summary = Simulation(fedavg, tmp_path / "fedavg").run()
    prox_loss = training_loss(fedprox, tmp_path / "fedprox")
    avg_loss = training_loss(fedavg, tmp_path / "fedavg")
    assert prox_loss < avg_loss
    assert prox_summary["rounds_aborted"] == 0  # partial work always reaches the quorum
    assert avg_summary["rounds_aborted"] > 0  # dropping 90% often leaves nobody
