"""Who trains in a simulation: device states, the [selection] policy, [versions] by round."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.config import Config, apply_overrides, load_config, parse_config
from shoal.coordinator.eligibility import VERSIONS, EligibilityPolicy
from shoal.coordinator.events import SendEvaluateTask, SendFitTask
from shoal.core.settings import read_toml
from shoal.registry import ClientRegistry, ClientStatus
from shoal.registry.versioning import Component
from shoal.simulation.devices import Attempt
from shoal.simulation.population import client_index
from shoal.simulation.runner import Simulation, open_run_models

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cross-device-eligibility.toml"
FAST = ["simulation.workers=0", "evaluation.every=0", "evaluation.centralized=false"]


@dataclass(frozen=True)
class Trained:
    client_id: str
    round: int
    at: float


class Watched(Simulation):
    """The real simulator, noting each fit task it plays and when the round started."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained: list[Trained] = []

    def plan_attempt(
        self, task: SendFitTask | SendEvaluateTask, now: float, deadline: float
    ) -> Attempt:
        if isinstance(task, SendFitTask):
            self.trained.append(Trained(task.client_id, task.round, now))
        return super().plan_attempt(task, now, deadline)


def rows(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time_s"} for line in lines]


def example(*overrides: str, draining: bool = False) -> Config:
    """The example, small and fast; ``draining``: training is slow and drains batteries hard."""
    data = read_toml(EXAMPLE)
    for device in data["devices"]["classes"] if draining else ():
        device["examples_per_second"] = 1.0
        device["states"]["training_drain_per_hour"] = 10.0
    settings = ["data.num_clients=3000", "run.rounds=3", *FAST, *overrides]
    return parse_config(apply_overrides(data, settings))


def test_the_example_trains_only_eligible_devices_at_night_and_counts_the_excluded(
    tmp_path: Path,
) -> None:
    config = example()
    simulation = Watched(config, tmp_path)
    summary = simulation.run()
    assert summary["rounds_completed"] == 3
    assert simulation.trained
    policy = EligibilityPolicy(config.selection, config.versions)
    states = simulation.fleet.states
    for trained in simulation.trained:
        index = np.array([client_index(trained.client_id)], dtype=np.int64)
        facts = simulation.fleet.facts(index, at=trained.at)
        screening = policy.screen(facts, round_number=trained.round)
        assert screening.eligible.tolist() == [True], (trained, screening.excluded)
        assert facts.charging[0] == 1.0 and facts.wifi[0] == 1.0 and facts.idle[0] == 1.0
        assert facts.battery_level[0] >= 0.5 and facts.ram_gb[0] >= 2
        hour = float(states.local_hours(index, at=trained.at)[0])
        assert hour >= 20 or hour < 9, (trained, hour)  # night in the device's own time zone
        assert states.utc_offsets(index)[0] != 8.0  # 11:00 there: nobody trains
    fits = [row for row in rows(tmp_path) if row["phase"] == "fit"]
    for row in fits:
        assert set(row["excluded"]) == set(config.selection.criteria())
        assert row["excluded"]["charging"] > 0 and row["excluded"]["ram"] > 0
        # a cohort-sized sample of the 3,000 (16 per member), not the whole fleet
        assert max(row["excluded"].values()) < row["examined"] <= 16 * row["selected"]


def test_an_old_app_version_stops_training_from_the_round_a_requirement_applies(
    tmp_path: Path,
) -> None:
    config = load_config(
        None,
        [
            "run.rounds=4",
            "data.num_clients=60",
            "round.clients_per_round=20",
            "round.over_selection=1.0",
            *FAST,
            'devices.classes=[{name = "phone", share = 1.0, examples_per_second = 50, '
            'app_versions = {"2.5.0" = 0.6, "2.3.1" = 0.4}}]',
            'versions.require=[{component = "app", minimum = "2.5", from_round = 3}]',
        ],
    )
    simulation = Watched(config, tmp_path)
    simulation.run()
    versions: dict[int, set[str]] = {}
    for trained in simulation.trained:
        index = np.array([client_index(trained.client_id)], dtype=np.int64)
        app = simulation.fleet.facts(index, at=trained.at).versions[Component.APP][0]
        versions.setdefault(trained.round, set()).add(app)
    assert versions[1] == versions[2] == {"2.5.0", "2.3.1"}  # the old share trains ...
    assert versions[3] == versions[4] == {"2.5.0"}  # ... until the requirement applies
    excluded = {row["round"]: row["excluded"] for row in rows(tmp_path)}
    assert excluded[1] == excluded[2] == {}
    assert excluded[3][VERSIONS] > 0 and excluded[4][VERSIONS] > 0
    assert 0.25 < excluded[3][VERSIONS] / 60 < 0.55  # the whole fleet is examined: the old share


def test_a_resumed_run_sees_the_same_states_and_batteries(tmp_path: Path) -> None:
    # training drains hard here: the batteries a round drains decide who may train next
    heavy = ["data.num_clients=2000", "round.deadline_s=1200"]
    slow = {"draining": True}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Simulation(example(*heavy, "run.rounds=4", **slow), straight).run()
    Simulation(example(*heavy, "run.rounds=2", **slow), resumed).run()
    Simulation(example(*heavy, "run.rounds=4", **slow), resumed, resume=True).run()
    assert rows(resumed) == rows(straight)
    drained = [row["battery_drain"]["devices"] for row in rows(straight)]
    assert all(drained) and max(max(d.values()) for d in drained) > 0.5


def test_a_large_fleet_enrolls_the_clients_it_selects_and_bars_the_suspended(
    tmp_path: Path,
) -> None:
    config = example("data.num_clients=5000", "run.rounds=2")
    simulation = Watched(config, tmp_path)
    simulation.run()
    selected = {trained.client_id for trained in simulation.trained}
    models = open_run_models(tmp_path)
    clients = ClientRegistry(models.database)
    enrolled = {record.client_id for record in clients.list(limit=10_000)}
    assert enrolled == selected
    record = clients.get(sorted(selected)[0])
    assert record.device.device_class in {c.name for c in config.devices.classes}
    assert record.app_version in {"2.5.0", "2.4.2"}  # the policy's minimum is 2.4
    assert record.device.charging is True and record.device.wifi is True
    for client in selected:
        clients.set_status(client, ClientStatus.SUSPENDED, "poisoned")
    models.database.close()
    later = Watched(example("data.num_clients=5000", "run.rounds=4"), tmp_path, resume=True)
    later.run()
    assert later.trained and not selected & {trained.client_id for trained in later.trained}


@pytest.mark.filterwarnings("ignore::shoal.privacy.noise.InsecureNoiseWarning")
def test_a_dp_fit_round_screens_the_whole_online_fleet(tmp_path: Path) -> None:
    # under DP the eligible population is what a round samples from and accounts for
    config = example(
        "run.rounds=1",
        "privacy.placement='central'",
        "privacy.noise_multiplier=1.0",
        "privacy.secure_noise=false",
    )
    simulation = Watched(config, tmp_path)
    simulation.run()
    (row,) = rows(tmp_path)
    online = simulation.fleet.available_indices(1)
    facts = simulation.fleet.facts(online, at=0.0)
    expected = EligibilityPolicy(config.selection, config.versions).screen(facts, round_number=1)
    assert row["excluded"] == expected.excluded
    assert row["examined"] == len(online)
    assert sum(expected.excluded.values()) > 3000  # far more than a cohort-sized sample holds
