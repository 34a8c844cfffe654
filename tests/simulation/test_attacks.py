"""Simulated attackers: each behaviour on the update, who attacks, the config, and runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.apps import builtin
from shoal.client.api import (
    Client,
    EvaluateConfig,
    EvaluateResult,
    FitConfig,
    FitResult,
    fit_update,
)
from shoal.client.app import ClientApp
from shoal.client.numpy_models import NumpyClient, SoftmaxRegression
from shoal.config import DEFAULT_TRIGGER, AttackEntry, Config, apply_overrides, parse_config
from shoal.core import ConfigError
from shoal.core.parameters import Parameters
from shoal.simulation.attacks import (
    Attackers,
    AttackingClient,
    Poisoning,
    attack_draw,
    backdoor_success_rate,
    default_scale,
    flipped_labels,
    with_trigger,
)
from shoal.simulation.population import ClientNames
from shoal.simulation.runner import Simulation

DELTA = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
START = Parameters.from_arrays([np.array([1.0, 1.0, 1.0, 1.0], np.float32)])


class Honest(Client):
    """Adds ``DELTA`` (repeated to the model's size) to the model it gets; claims 7 examples."""

    def get_parameters(self) -> Parameters:
        return START

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        delta = np.resize(DELTA, parameters.vector.size)
        return FitResult(parameters.with_vector(parameters.vector + delta), 7, {"loss": 0.3})

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return EvaluateResult(0.1, 3)


def entry(**fields: Any) -> AttackEntry:
    return AttackEntry(**{"fraction": 0.5, **fields})


def attacked_update(attack: AttackEntry, *, round_number: int = 1, scale: float = 3.0) -> Any:
    client = AttackingClient(
        Honest(), attack, attack_index=0, client_id="client-00001", seed=0, scale=scale,
        num_classes=10,
    )  # fmt: skip
    result = client.fit(START, FitConfig(round=round_number))
    assert result.num_examples == 7  # every attacker claims its usual weight
    assert result.is_update
    assert isinstance(result.parameters, Parameters)
    return result.parameters.vector


# --- each behaviour, on the update ---------------------------------------------------------


def test_sign_flip_sends_the_negated_update() -> None:
    np.testing.assert_array_equal(attacked_update(entry(kind="sign_flip")), -DELTA)


def test_scaling_multiplies_the_update_by_its_scale() -> None:
    np.testing.assert_allclose(attacked_update(entry(kind="scaling"), scale=10.0), 10 * DELTA)


def test_default_scale_is_n_over_eta() -> None:
    config = parse_config(
        apply_overrides({}, ["round.clients_per_round=20", "strategy.server_learning_rate=0.5"])
    )
    assert default_scale(config) == 40.0
    assert default_scale(Config()) == Config().round.clients_per_round


def test_gaussian_noise_is_pure_noise_of_its_std_and_reproducible() -> None:
    attack = entry(kind="gaussian_noise", noise_std=2.0)
    first, again = attacked_update(attack), attacked_update(attack)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, attacked_update(attack, round_number=2))
    client = AttackingClient(
        Honest(), attack, attack_index=0, client_id="c", seed=0, scale=1.0, num_classes=10
    )
    wide = Parameters.from_arrays([np.zeros(20_000, np.float32)])
    result = client.fit(wide, FitConfig(round=1))
    assert isinstance(result.parameters, Parameters)
    assert result.parameters.vector.std() == pytest.approx(2.0, rel=0.03)


def test_free_rider_sends_the_global_model_back() -> None:
    np.testing.assert_array_equal(attacked_update(entry(kind="free_rider")), np.zeros(4))


def test_attackers_are_honest_outside_their_rounds() -> None:
    attack = entry(kind="sign_flip", from_round=3, until_round=4)
    for round_number, expected in [(2, DELTA), (3, -DELTA), (4, -DELTA), (5, DELTA)]:
        client = AttackingClient(
            Honest(), attack, attack_index=0, client_id="c", seed=0, scale=1.0, num_classes=10
        )
        result = client.fit(START, FitConfig(round=round_number))
        np.testing.assert_array_equal(fit_update(result, START).vector, expected)


def test_evaluation_stays_honest() -> None:
    client = AttackingClient(
        Honest(), entry(kind="sign_flip"), attack_index=0, client_id="c", seed=0, scale=1.0,
        num_classes=10,
    )  # fmt: skip
    assert client.evaluate(START, EvaluateConfig(round=1)) == EvaluateResult(0.1, 3)
    assert client.get_parameters() is START


def test_label_flip_maps_y_to_c_minus_1_minus_y_or_to_the_target() -> None:
    labels = np.array([0, 1, 9, 4])
    np.testing.assert_array_equal(flipped_labels(labels, num_classes=10), [9, 8, 0, 5])
    np.testing.assert_array_equal(flipped_labels(labels, num_classes=10, target_label=2), [2] * 4)
    np.testing.assert_array_equal(flipped_labels(np.array([], np.int64), num_classes=2), [])
    with pytest.raises(ConfigError, match=r"attack\.num_classes"):
        flipped_labels(labels, num_classes=5)


def test_backdoor_poisons_its_share_of_examples_with_the_trigger_and_target() -> None:
    attack = entry(kind="backdoor", target_label=3, poison_fraction=0.25)
    features = np.random.default_rng(0).uniform(0, 0.5, (40, 64)).astype(np.float32)
    features[0, 0] = 1.0  # the data's max: the trigger's default value
    labels = np.arange(40) % 10
    poisoned_x, poisoned_y = Poisoning(attack, 10, (0, 1))(features, labels)
    changed = np.flatnonzero(np.any(poisoned_x != features, axis=1))
    assert changed.size == 10
    np.testing.assert_array_equal(poisoned_x[changed][:, list(DEFAULT_TRIGGER)], 1.0)
    np.testing.assert_array_equal(poisoned_y[changed], 3)
    untouched = np.setdiff1d(np.arange(40), changed)
    np.testing.assert_array_equal(poisoned_y[untouched], labels[untouched])
    again_x, _ = Poisoning(attack, 10, (0, 1))(features, labels)
    np.testing.assert_array_equal(again_x, poisoned_x)  # the attacker's data is fixed


def test_trigger_past_the_features_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"attack\.trigger"):
        with_trigger(np.zeros((2, 8), np.float32), trigger=[9], value=1.0)
    assert with_trigger(np.zeros((0, 64), np.float32), trigger=[1], value=None).shape == (0, 64)


def test_data_attacks_train_on_the_rewritten_examples() -> None:
    model = SoftmaxRegression(num_features=64, num_classes=10)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 1, (30, 64)).astype(np.float32), rng.integers(0, 10, 30)
    honest = NumpyClient(model, train_data=(x, y), parameters=model.init_parameters(rng))
    flip = AttackingClient(
        honest, entry(kind="label_flip"), attack_index=0, client_id="c", seed=0, scale=1.0,
        num_classes=10,
    )  # fmt: skip
    assert isinstance(flip.trainer, NumpyClient)
    np.testing.assert_array_equal(flip.trainer.train_y, 9 - y)
    np.testing.assert_array_equal(honest.train_y, y)  # the honest client's data is its own


def test_backdoor_success_rate_counts_triggered_non_targets_put_in_the_target() -> None:
    features = np.zeros((4, 64), np.float32)
    labels = np.array([0, 1, 2, 3])

    def says_zero_when_triggered(_: Parameters, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.shape[0], 10))
        out[:, 0] = rows[:, DEFAULT_TRIGGER[0]]
        out[:, 5] = 0.5
        return out

    attack = entry(kind="backdoor", trigger_value=1.0)
    assert (
        backdoor_success_rate(
            START, features, labels, entry=attack, probabilities=says_zero_when_triggered
        )
        == 1.0
    )
    only_target = np.zeros(3, np.int64)
    assert (
        backdoor_success_rate(
            START, features[:3], only_target, entry=attack, probabilities=says_zero_when_triggered
        )
        == 0.0
    )


# --- who attacks -----------------------------------------------------------------------------


def attackers_of(*entries: dict[str, Any], clients: int = 2000, seed: int = 0) -> Attackers:
    data = apply_overrides({}, [f"data.num_clients={clients}", f"run.seed={seed}"])
    config = parse_config({**data, "attack": list(entries)})
    return Attackers(config, ClientNames(clients))


def chosen(attackers: Attackers, clients: int) -> set[str]:
    return {c for c in ClientNames(clients) if attackers.attack_of(c) is not None}


def test_attackers_are_exactly_the_fraction_and_the_same_every_time() -> None:
    attackers = attackers_of({"kind": "sign_flip", "fraction": 0.2})
    first = chosen(attackers, 2000)
    assert len(first) == 400  # a fifth of the population, not a draw about it
    assert chosen(attackers_of({"kind": "sign_flip", "fraction": 0.2}), 2000) == first
    assert chosen(attackers_of({"kind": "sign_flip", "fraction": 0.2}, seed=1), 2000) != first
    assert len(chosen(attackers_of({"kind": "scaling", "fraction": 0.27}, clients=10), 10)) == 3


def test_who_attacks_is_the_lowest_keyed_draws() -> None:
    small = chosen(attackers_of({"kind": "scaling", "fraction": 0.3}, clients=100), 100)
    draws = sorted((attack_draw(seed=0, attack_index=0, client_id=c), c) for c in ClientNames(100))
    assert small == {c for _, c in draws[:30]}
    assert attack_draw(seed=0, attack_index=0, client_id="client-00007") != attack_draw(
        seed=0, attack_index=1, client_id="client-00007"
    )


def test_named_attackers_and_the_first_entry_wins() -> None:
    attackers = attackers_of(
        {"kind": "free_rider", "clients": ["client-00003"], "until_round": 2},
        {"kind": "sign_flip", "fraction": 1.0},
    )
    found = attackers.attack_of("client-00003")
    assert found is not None and found[0] == 0 and found[1].kind == "free_rider"
    assert attackers.attacking("client-00003", 2) and not attackers.attacking("client-00003", 3)
    assert attackers.count(["client-00003", "client-00004"], 3) == 1
    assert not attackers_of()  # no [[attack]]: no attackers


def test_a_named_attacker_outside_the_population_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"attack.0.clients: 'client-00100' is not one of"):
        attackers_of({"kind": "sign_flip", "clients": ["client-00100"]}, clients=100)


# --- the config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        ({"kind": "sign_flip"}, "give fraction or clients"),
        ({"kind": "sign_flip", "fraction": 0.1, "clients": ["client-00001"]}, "fraction or"),
        ({"kind": "sign_flip", "fraction": 0.0}, "attack.0.fraction"),
        ({"kind": "sign_flip", "fraction": 1.5}, "attack.0.fraction"),
        ({"kind": "bit_flip", "fraction": 0.1}, "attack.0.kind"),
        ({"kind": "sign_flip", "fraction": 0.1, "from_round": 0}, "attack.0.from_round"),
        ({"kind": "sign_flip", "fraction": 0.1, "from_round": 3, "until_round": 2}, "before"),
        ({"kind": "sign_flip", "fraction": 0.1, "noise_std": 2.0}, "noise_std does not apply"),
        ({"kind": "gaussian_noise", "fraction": 0.1, "scale": 2.0}, "scale does not apply"),
        ({"kind": "scaling", "fraction": 0.1, "scale": -1.0}, "attack.0.scale"),
        ({"kind": "backdoor", "fraction": 0.1, "target_label": 10}, "not below the 10"),
        ({"kind": "backdoor", "fraction": 0.1, "trigger": [1, 1]}, "trigger lists each"),
        ({"kind": "backdoor", "fraction": 0.1, "trigger": []}, "attack.0.trigger"),
        ({"kind": "label_flip", "fraction": 0.1, "poison_fraction": 0.2}, "does not apply"),
        ({"kind": "sign_flip", "fraction": 0.1, "colour": "red"}, "attack.0.colour: unknown key"),
        ({"kind": "gaussian_noise", "fraction": 0.1, "noise_std": float("inf")}, "finite"),
        ({"kind": "sign_flip", "fraction": 0.1, "from_round": 2**64}, "above the limit"),
    ],
)
def test_bad_attacks_are_refused_naming_the_key(attack: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"attack": [attack]})


def test_a_client_app_without_the_data_hook_is_refused_in_one_line(tmp_path: Path) -> None:
    app = ClientApp(lambda context: Honest())
    config = small_run(attack=[{"kind": "label_flip", "fraction": 0.5}])
    with pytest.raises(ConfigError, match=r"attack.0 \(kind = 'label_flip'\).*with_training_data"):
        Simulation(config, tmp_path, client_app=app)
    model_attack = small_run(attack=[{"kind": "sign_flip", "fraction": 0.5}])
    Simulation(model_attack, tmp_path, client_app=app)  # a model attack needs no hook


# --- runs ---------------------------------------------------------------------------------------


def small_run(*overrides: str, attack: list[dict[str, Any]] | None = None) -> Config:
    base = [
        "run.rounds=4",
        "data.num_clients=20",
        "data.partition='iid'",
        "round.clients_per_round=10",
        "round.over_selection=1.0",
        "evaluation.every=0",
        "simulation.workers=0",
        "client.epochs=2",
    ]
    data = apply_overrides({}, [*base, *overrides])
    return parse_config({**data, "attack": attack or []})


def rows_of(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_rows_count_attackers_only_when_attacked(tmp_path: Path) -> None:
    Simulation(small_run("run.rounds=2"), tmp_path / "clean").run()
    assert all("attackers_selected" not in row for row in rows_of(tmp_path / "clean"))
    attack = [{"kind": "sign_flip", "fraction": 0.3, "from_round": 2}]
    summary = Simulation(small_run("run.rounds=2", attack=attack), tmp_path / "bad").run()
    first, second = rows_of(tmp_path / "bad")
    assert first["attackers_selected"] == first["attackers_reported"] == 0  # not yet attacking
    attackers = Attackers(small_run(attack=attack), ClientNames(20))
    assert 0 < second["attackers_selected"] <= attackers.count(ClientNames(20), 2)
    assert second["attackers_reported"] <= second["attackers_selected"]
    assert "backdoor_success_rate" not in second
    assert "final_backdoor_success_rate" not in summary


def test_models_before_from_round_are_the_clean_runs_bit_for_bit(tmp_path: Path) -> None:
    attack = [{"kind": "scaling", "fraction": 0.5, "from_round": 3}]
    Simulation(small_run(), tmp_path / "clean").run()
    Simulation(small_run(attack=attack), tmp_path / "bad").run()
    clean, bad = rows_of(tmp_path / "clean"), rows_of(tmp_path / "bad")
    assert [row["sha256"] for row in clean[:2]] == [row["sha256"] for row in bad[:2]]
    assert clean[2]["sha256"] != bad[2]["sha256"]


def test_workers_agree_with_this_process_on_who_attacks(tmp_path: Path) -> None:
    attack = [{"kind": "gaussian_noise", "fraction": 0.3, "noise_std": 0.01}]
    Simulation(small_run("run.rounds=1", attack=attack), tmp_path / "serial").run()
    pool = small_run("run.rounds=1", "simulation.workers=2", attack=attack)
    Simulation(pool, tmp_path / "pool").run()
    (serial,), (pooled,) = rows_of(tmp_path / "serial"), rows_of(tmp_path / "pool")
    assert serial["committed"] and serial["attackers_reported"] > 0
    assert serial["sha256"] == pooled["sha256"]
    assert serial["attackers_reported"] == pooled["attackers_reported"]


def test_a_backdoor_without_the_server_hooks_warns_and_leaves_the_metric_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    attack = [{"kind": "backdoor", "fraction": 0.3}]
    with caplog.at_level(logging.WARNING, logger="shoal.simulation"):
        simulation = Simulation(
            small_run("run.rounds=1", attack=attack), tmp_path, client_app=builtin.client_app
        )
    assert "test_data and probabilities" in caplog.text
    summary = simulation.run()
    assert "backdoor_success_rate" not in rows_of(tmp_path)[0]
    assert "final_backdoor_success_rate" not in summary


def robustness_run(strategy: str, attack: list[dict[str, Any]]) -> Config:
    """Twenty IID clients, all in every round: six named attackers are 30% of each round."""
    return small_run(
        "run.rounds=8",
        "round.clients_per_round=20",
        "client.epochs=3",
        "client.learning_rate=0.2",
        "client.batch_size=8",
        "policy.enabled=false",
        f"strategy.name='{strategy}'",
        attack=attack,
    )


def test_sign_flip_hurts_fedavg_while_the_median_holds(tmp_path: Path) -> None:
    attackers = [f"client-{index:05d}" for index in (1, 4, 7, 10, 13, 16)]
    attack = [{"kind": "sign_flip", "clients": attackers}]
    clean = Simulation(robustness_run("fedavg", []), tmp_path / "clean").run()
    mean = Simulation(robustness_run("fedavg", attack), tmp_path / "mean").run()
    median = Simulation(robustness_run("fedmedian", attack), tmp_path / "median").run()
    assert rows_of(tmp_path / "median")[0]["attackers_reported"] == 6
    assert mean["final_accuracy"] < clean["final_accuracy"] - 0.05
    assert median["final_accuracy"] > clean["final_accuracy"] - 0.03


def test_a_backdoor_succeeds_once_it_starts(tmp_path: Path) -> None:
    attack = [{"kind": "backdoor", "fraction": 0.3, "from_round": 4}]
    config = small_run("run.rounds=7", "client.learning_rate=0.2", attack=attack)
    summary = Simulation(config, tmp_path).run()
    rates = [row["backdoor_success_rate"] for row in rows_of(tmp_path)]
    assert len(rates) == 7  # every committed version is measured
    assert max(rates[:3]) < 0.2  # the trigger means nothing to a clean model
    assert summary["final_backdoor_success_rate"] == rates[-1] > max(rates[:3]) + 0.4
