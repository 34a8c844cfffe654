"""Tests of strategy presets, overrides, bad names, and the package's public API."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import shoal.aggregation
from shoal.aggregation import (
    AGGREGATORS,
    PRESETS,
    CoordinateMedian,
    Krum,
    Strategy,
    TrimmedMean,
    WeightedMean,
    make_aggregator,
    make_strategy,
    server_adagrad,
    server_adam,
    server_sgd,
    server_yogi,
)
from shoal.core.errors import StrategyError
from shoal.core.transforms import Transform

DELTA = np.array([0.5, -2.0, 1e-3], np.float32)


def first_steps(optimizer: Transform, rounds: int = 2) -> list[np.ndarray]:
    state = optimizer.init(np.zeros(3, np.float32))
    steps = []
    for _ in range(rounds):
        step, state = optimizer.update(DELTA, state)
        steps.append(step)
    return steps


def assert_same_optimizer(actual: Transform, expected: Transform) -> None:
    for got, want in zip(first_steps(actual), first_steps(expected), strict=True):
        np.testing.assert_array_equal(got, want)


def test_public_names() -> None:
    assert PRESETS == (
        "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian",
        "fedprox", "fedtrimmedavg", "fedyogi", "krum", "multikrum",
    )  # fmt: skip
    assert AGGREGATORS == ("krum", "mean", "median", "multikrum", "trimmed_mean")
    assert {"Strategy", "make_strategy", "WeightedMean", "Krum"} <= set(shoal.aggregation.__all__)


EXPECTED_PRESETS = [
    ("fedavg", WeightedMean(), server_sgd(), 0.0),
    ("fedavgm", WeightedMean(), server_sgd(momentum=0.9), 0.0),
    ("fedprox", WeightedMean(), server_sgd(), 0.01),
    ("fedadam", WeightedMean(), server_adam(learning_rate=1e-2, tau=1e-3), 0.0),
    ("fedyogi", WeightedMean(), server_yogi(learning_rate=1e-2, tau=1e-3), 0.0),
    ("fedadagrad", WeightedMean(), server_adagrad(learning_rate=1e-1, tau=1e-3), 0.0),
    ("fedmedian", CoordinateMedian(), server_sgd(), 0.0),
    ("fedtrimmedavg", TrimmedMean(trim_ratio=0.1), server_sgd(), 0.0),
    ("krum", Krum(num_byzantine=1, num_selected=1), server_sgd(), 0.0),
    ("multikrum", Krum(num_byzantine=1, num_selected=None), server_sgd(), 0.0),
]


@pytest.mark.parametrize(("name", "aggregator", "optimizer", "mu"), EXPECTED_PRESETS)
def test_presets(name: str, aggregator: object, optimizer: Transform, mu: float) -> None:
    strategy = make_strategy(name)
    assert strategy.name == name
    assert strategy.aggregator == aggregator
    assert strategy.proximal_mu == mu
    assert_same_optimizer(strategy.server_optimizer, optimizer)


def test_every_preset_is_covered() -> None:
    assert sorted(name for name, *_ in EXPECTED_PRESETS) == list(PRESETS)


def test_fedavg_step_is_the_delta() -> None:
    np.testing.assert_array_equal(first_steps(make_strategy("fedavg").server_optimizer)[0], DELTA)


def test_optimizer_overrides() -> None:
    assert_same_optimizer(
        make_strategy("fedavg", server_learning_rate=0.5, server_momentum=0.5).server_optimizer,
        server_sgd(learning_rate=0.5, momentum=0.5),
    )
    assert_same_optimizer(
        make_strategy("fedavgm", server_momentum=0.5).server_optimizer,
        server_sgd(momentum=0.5),
    )
    assert_same_optimizer(
        make_strategy(
            "fedadam", server_learning_rate=0.3, beta1=0.5, beta2=0.9, tau=0.1
        ).server_optimizer,
        server_adam(learning_rate=0.3, beta1=0.5, beta2=0.9, tau=0.1),
    )
    assert_same_optimizer(
        make_strategy("fedyogi", beta2=0.5).server_optimizer, server_yogi(beta2=0.5)
    )
    assert_same_optimizer(
        make_strategy("fedadagrad", beta1=0.9, tau=0.5).server_optimizer,
        server_adagrad(beta1=0.9, tau=0.5),
    )


def test_aggregator_overrides() -> None:
    strategy = make_strategy("fedadam", aggregator="median")
    assert strategy.name == "fedadam+median"
    assert strategy.aggregator == CoordinateMedian()
    assert_same_optimizer(strategy.server_optimizer, server_adam())
    assert make_strategy("fedavg", aggregator="mean").name == "fedavg"
    assert make_strategy("fedtrimmedavg", trim_ratio=0.3).aggregator == TrimmedMean(trim_ratio=0.3)
    assert make_strategy("krum", num_byzantine=2).aggregator == Krum(num_byzantine=2)
    assert make_strategy("multikrum", num_byzantine=2, num_selected=4).aggregator == Krum(
        num_byzantine=2, num_selected=4
    )
    assert make_strategy("fedyogi", aggregator="trimmed_mean").aggregator == TrimmedMean()
    assert make_strategy("fedavg", aggregator="multikrum").aggregator == Krum(num_selected=None)


def test_proximal_mu_override_applies_to_any_preset() -> None:
    assert make_strategy("fedprox", proximal_mu=0.1).proximal_mu == 0.1
    assert make_strategy("fedadam", proximal_mu=0.5).proximal_mu == 0.5
    assert make_strategy("fedprox", proximal_mu=0.0).proximal_mu == 0.0


def test_unknown_preset_lists_the_allowed_names() -> None:
    with pytest.raises(StrategyError, match="unknown strategy preset 'fedsgd'") as caught:
        make_strategy("fedsgd")
    for name in PRESETS:
        assert name in str(caught.value)


def test_unknown_aggregator_lists_the_allowed_names() -> None:
    with pytest.raises(StrategyError, match="unknown aggregator 'mode'") as caught:
        make_strategy("fedavg", aggregator="mode")
    assert ", ".join(AGGREGATORS) in str(caught.value)
    with pytest.raises(StrategyError, match="unknown aggregator"):
        make_aggregator("Mean")


@pytest.mark.parametrize(
    ("name", "options", "refused"),
    [
        ("fedavg", {"beta2": 0.9}, "beta2"),
        ("fedavg", {"tau": 0.1}, "tau"),
        ("fedadam", {"server_momentum": 0.9}, "server_momentum"),
        ("fedadagrad", {"beta2": 0.9}, "beta2"),
        ("fedavg", {"trim_ratio": 0.1}, "trim_ratio"),
        ("fedmedian", {"num_byzantine": 1}, "num_byzantine"),
        ("krum", {"num_selected": 3}, "num_selected"),
        ("fedtrimmedavg", {"num_byzantine": 1}, "num_byzantine"),
        ("fedadam", {"aggregator": "median", "trim_ratio": 0.2}, "trim_ratio"),
    ],
)
def test_options_that_do_not_apply_are_refused(
    name: str, options: dict[str, object], refused: str
) -> None:
    with pytest.raises(StrategyError, match=f"does not take {refused}"):
        make_strategy(name, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"server_learning_rate": 0.0}, "learning_rate"),
        ({"server_momentum": 1.0}, "momentum"),
        ({"proximal_mu": -0.1}, "proximal_mu"),
        ({"proximal_mu": float("inf")}, "proximal_mu"),
        ({"aggregator": "trimmed_mean", "trim_ratio": 0.5}, "trim_ratio"),
        ({"aggregator": "krum", "num_byzantine": -1}, "num_byzantine"),
        ({"aggregator": "multikrum", "num_selected": 0}, "num_selected"),
    ],
)
def test_bad_values_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(StrategyError, match=message):
        make_strategy("fedavg", **options)  # type: ignore[arg-type]


def test_strategy_is_frozen_and_validated() -> None:
    strategy = make_strategy("fedavg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        strategy.proximal_mu = 1.0  # type: ignore[misc]
    with pytest.raises(StrategyError, match="non-empty name"):
        Strategy(name="", aggregator=WeightedMean(), server_optimizer=server_sgd())
    with pytest.raises(StrategyError, match=re.escape("proximal_mu")):
        Strategy(name="x", aggregator=WeightedMean(), server_optimizer=server_sgd(), proximal_mu=-1)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_trains_a_quadratic_toward_the_client_optimum(name: str) -> None:
    """Clients at optima c_i take half a step toward them; the global model follows."""
    rng = np.random.default_rng(0)
    optima = [np.array([3.0, -1.0, 2.0], np.float32) + rng.normal(0, 0.1, 3).astype(np.float32)
              for _ in range(10)]  # fmt: skip
    target = np.mean(optima, axis=0)
    strategy = make_strategy(name)
    rule, optimizer = strategy.aggregator, strategy.server_optimizer
    global_vector = np.zeros(3, np.float32)
    optimizer_state = optimizer.init(global_vector)
    start = float(np.linalg.norm(global_vector - target))
    for _ in range(60):
        state = rule.init(num_parameters=3)
        for optimum in optima:
            delta = ((optimum - global_vector) * np.float32(0.5)).astype(np.float32)
            state = rule.accumulate(state, delta, weight=1.0)
        step, optimizer_state = optimizer.update(rule.finalize(state), optimizer_state)
        global_vector = global_vector + step
    # The adaptive presets take steps of about η (1e-2 or 1e-1) per coordinate.
    shrink = 0.1 if name not in {"fedadam", "fedyogi", "fedadagrad"} else 0.9
    assert float(np.linalg.norm(global_vector - target)) < shrink * start
