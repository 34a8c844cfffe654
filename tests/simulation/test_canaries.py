"""Canaries planted in a simulation: the model memorizes them without DP, much less with it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.apps.builtin import client_app, server_app
from shoal.client.api import Client, EvaluateResult, FitResult
from shoal.client.app import ClientContext
from shoal.client.numpy_models import NumpyClient
from shoal.config import parse_config
from shoal.coordinator.app import ServerApp
from shoal.core import ConfigError
from shoal.core.parameters import Parameters
from shoal.simulation.canaries import (
    CANARIES_FILE,
    PlantCanaries,
    PlantedClients,
    Records,
    draw_plan,
)
from shoal.simulation.population import Population, packed, unpacked
from shoal.simulation.runner import Simulation
from shoal.tasks import EvaluateConfig, FitConfig

pytestmark = pytest.mark.filterwarnings(
    "ignore::shoal.privacy.noise.InsecureNoiseWarning", "ignore::UserWarning"
)

# a few holders train on five canaries, 20 copies each: memorized without DP, in 1 s
BASE: dict[str, Any] = {
    "run": {"rounds": 10, "seed": 1},
    "data": {"num_clients": 30},
    "round": {"clients_per_round": 10, "over_selection": 1.0},
    "evaluation": {"every": 0},
    "simulation": {"workers": 0},
    "canaries": {"enabled": True, "holders": 3, "repeats": 20, "count": 5, "references": 500},
}
STRONG_DP = {"placement": "central", "noise_multiplier": 5.0, "clip_norm": 0.5}


def _config(**sections: dict[str, Any]) -> Any:
    data = {**BASE, **sections}
    data["canaries"] = {**BASE["canaries"], **sections.get("canaries", {})}
    return parse_config(data)


def _run(tmp_path: Path, name: str, **sections: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = Simulation(_config(**sections), tmp_path / name).run()
    return summary


@pytest.mark.parametrize("seed", [1, 2])
def test_planted_canaries_are_exposed_without_dp_and_much_less_with_user_level_dp(
    tmp_path: Path, seed: int
) -> None:
    plain = _run(tmp_path, "plain", run={**BASE["run"], "seed": seed})["canary_exposure"]
    private = _run(
        tmp_path,
        "private",
        run={**BASE["run"], "seed": seed},
        privacy={**STRONG_DP, "secure_noise": False},
    )["canary_exposure"]
    top = math.log2(500 + 1)
    # memorized: near the most likely of the 501 candidates, far above never-planted records
    assert plain["mean"] > 0.6 * top
    assert plain["mean"] > plain["unplanted_mean"] + 3.0
    # the attack of the paper on the private model: the canaries hide among the references
    assert private["mean"] < plain["mean"] - 3.0
    assert private["mean"] < private["unplanted_mean"] + 2.0
    assert len(plain["per_canary"]) == len(plain["extrapolated"]) == 5


def test_the_report_says_what_exposure_means_and_who_held_the_canaries(tmp_path: Path) -> None:
    summary = _run(tmp_path, "run")
    report = json.loads((tmp_path / "run" / CANARIES_FILE).read_text())
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stored["canary_exposure"] == summary["canary_exposure"]
    assert "log2(|R|)" in report["meaning"] and "memorized" in report["meaning"]
    assert len(report["holders"]) == report["holders_count"] == 3
    assert report["references"] == 500 and report["max_by_rank"] == pytest.approx(8.9687)
    assert report["per_canary"] == summary["canary_exposure"]["per_canary"]
    assert max(report["per_canary"]) == report["max"] == summary["canary_exposure"]["max"]


def test_every_version_adds_the_exposure_to_each_committed_fit_round(tmp_path: Path) -> None:
    config = _config(canaries={"every_version": True}, run={**BASE["run"], "rounds": 3})
    Simulation(config, tmp_path / "run").run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    fits = [row for row in rows if row["phase"] == "fit" and row["committed"]]
    assert len(fits) == 3
    assert all(row["canary_exposure"] >= 0 and "canary_exposure_unplanted" in row for row in fits)


def test_disabled_canaries_leave_the_run_as_it_was(tmp_path: Path) -> None:
    summary = _run(tmp_path, "off", canaries={"enabled": False})
    assert "canary_exposure" not in summary
    assert not (tmp_path / "off" / CANARIES_FILE).exists()


def test_the_plan_derives_from_the_seed_and_holds_the_share_of_the_population() -> None:
    test = Records(np.array([[0.0, 1.0], [2.0, 3.0]], np.float32), np.array([0, 4]))
    shared = {"enabled": True, "clients": 0.2, "count": 6, "references": 50}
    plan = draw_plan(parse_config({"canaries": shared}), test)
    again = draw_plan(parse_config({"canaries": shared}), test)
    other = draw_plan(parse_config({"canaries": shared, "run": {"seed": 9}}), test)
    assert len(plan.holders) == 20  # 0.2 of the default 100 clients
    assert plan.holders == again.holders and plan.holders != other.holders
    assert np.array_equal(plan.canaries.features, again.canaries.features)
    assert not np.array_equal(plan.canaries.features, plan.controls.features)
    features = plan.references.features
    assert features.dtype == np.float32 and features.shape == (50, 2)
    assert features[:, 0].min() >= 0 and features[:, 0].max() <= 2  # each feature's range
    assert features[:, 1].min() >= 1 and features[:, 1].max() <= 3
    assert set(plan.references.labels.tolist()) <= set(range(5))
    counted = parse_config({"canaries": {**shared, "holders": 7}})
    assert len(draw_plan(counted, test).holders) == 7


def test_a_holder_trains_on_every_copy_and_the_others_on_their_own_data() -> None:
    canaries = Records(np.ones((2, 3), np.float32), np.array([1, 2]))
    features, labels = PlantCanaries(canaries, 4)(np.zeros((5, 3), np.float32), np.zeros(5, int))
    assert features.shape == (13, 3) and labels.tolist() == [0] * 5 + [1] * 4 + [2] * 4
    config = parse_config({"data": {"num_clients": 10}, "canaries": {"holders": 1}})
    plan = draw_plan(config, Records(np.zeros((3, 64), np.float32), np.arange(3)))
    (holder,) = plan.holders
    clients = PlantedClients(lambda name: _builtin(config, name), plan)
    planted = clients(holder)
    assert isinstance(planted, NumpyClient)
    plain = _builtin(config, holder)
    assert planted.train_y.size == plain.train_y.size + 10  # ten canaries, one copy each
    other = "client-00000" if holder != "client-00000" else "client-00001"
    assert clients(other).train_y.size == _builtin(config, other).train_y.size
    # what a worker process receives: the population's factory, wrapped, sent by value
    factory = PlantedClients(Population(client_app, config, {}).clients, plan)
    in_worker = unpacked(*packed(factory, []))(holder)
    assert isinstance(in_worker, NumpyClient)
    assert np.array_equal(in_worker.train_x, planted.train_x)


def _builtin(config: Any, name: str) -> NumpyClient:
    index = int(name.rsplit("-", 1)[1])
    context = ClientContext(
        client_id=name, partition_index=index, num_partitions=10, config=config, seed=0
    )
    client = client_app(context)
    assert isinstance(client, NumpyClient)
    return client


class Opaque(Client):
    """A client that hides its data: no with_training_data hook."""

    def __init__(self, inner: Client) -> None:
        self.inner = inner

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        return self.inner.fit(parameters, config)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return self.inner.evaluate(parameters, config)


def test_a_client_app_without_the_hook_is_one_config_error(tmp_path: Path) -> None:
    def opaque(context: ClientContext) -> Client:
        return Opaque(client_app(context))

    with pytest.raises(ConfigError, match="with_training_data") as caught:
        Simulation(_config(), tmp_path / "run", client_app=opaque, server_app=server_app)
    assert "\n" not in str(caught.value)
    # without canaries the same app runs
    Simulation(_config(canaries={"enabled": False}), tmp_path / "ok", client_app=opaque)


def test_a_server_app_without_test_data_is_one_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="test_data and probabilities"):
        Simulation(_config(), tmp_path / "run", client_app=client_app, server_app=ServerApp())


def test_holders_beyond_the_population_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"canaries\.holders"):
        parse_config({"data": {"num_clients": 20}, "canaries": {"holders": 21}})
    with pytest.raises(ConfigError, match=r"canaries\.references"):
        parse_config({"canaries": {"references": 2}})
