"""Tests of the server optimizers against hand computations of Reddi et al.'s Algorithm 2."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.aggregation import (
    AdaptiveState,
    SgdState,
    server_adagrad,
    server_adam,
    server_sgd,
    server_yogi,
)
from shoal.core.errors import StrategyError
from shoal.core.transforms import Transform, tree_leaves, tree_unflatten

DELTAS = [
    np.array([0.5, -2.0, 0.0, 1e-4], np.float32),
    np.array([0.25, 1.0, -3.0, 1e-4], np.float32),
    np.array([-1.0, -2.0, 0.5, 0.0], np.float32),
]

finite_vectors = hnp.arrays(
    np.float32,
    st.integers(0, 40),
    elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False),
)


def run(optimizer: Transform, deltas: list[np.ndarray]) -> list[np.ndarray]:
    state = optimizer.init(np.zeros_like(deltas[0]))
    steps = []
    for delta in deltas:
        step, state = optimizer.update(delta, state)
        assert step.dtype == np.float32
        steps.append(step)
    return steps


@settings(max_examples=100, deadline=None)
@given(global_vector=finite_vectors, data=st.data())
def test_fedavg_step_is_the_delta_exactly(global_vector: np.ndarray, data: st.DataObject) -> None:
    delta = data.draw(
        hnp.arrays(
            np.float32,
            global_vector.shape,
            elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False),
        )
    )
    optimizer = server_sgd(learning_rate=1.0)
    step, _ = optimizer.update(delta, optimizer.init(global_vector))
    np.testing.assert_array_equal(global_vector + step, global_vector + delta)


def test_sgd_scales_by_the_server_learning_rate() -> None:
    steps = run(server_sgd(learning_rate=0.5), DELTAS)
    for step, delta in zip(steps, DELTAS, strict=True):
        np.testing.assert_array_equal(step, delta * np.float32(0.5))


def test_momentum_accumulates_over_three_rounds() -> None:
    # m1 = Δ1; m2 = 0.9 m1 + Δ2; m3 = 0.9 m2 + Δ3; step = 0.5 m.
    d1, d2, d3 = (delta.astype(np.float64) for delta in DELTAS)
    m1 = d1
    m2 = 0.9 * m1 + d2
    m3 = 0.9 * m2 + d3
    steps = run(server_sgd(learning_rate=0.5, momentum=0.9), DELTAS)
    for step, momentum in zip(steps, [m1, m2, m3], strict=True):
        np.testing.assert_allclose(step, 0.5 * momentum, rtol=1e-6, atol=1e-9)
    # By hand for the first coordinate: 0.5, 0.7, -0.37 (times η = 0.5).
    np.testing.assert_allclose([s[0] for s in steps], [0.25, 0.35, -0.185], rtol=1e-6)


def reference(
    rule: str, deltas: list[np.ndarray], *, eta: float, b1: float, b2: float, tau: float
) -> list[np.ndarray]:
    """Algorithm 2 of Reddi et al. in float64, written out independently."""
    m = np.zeros(deltas[0].shape)
    v = np.full(deltas[0].shape, tau * tau)
    steps = []
    for delta in (d.astype(np.float64) for d in deltas):
        m = b1 * m + (1 - b1) * delta
        if rule == "adam":
            v = b2 * v + (1 - b2) * delta**2
        elif rule == "yogi":
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        else:
            v = v + delta**2
        steps.append(eta * m / (np.sqrt(v) + tau))
    return steps


@pytest.mark.parametrize(
    ("rule", "make"),
    [
        ("adam", lambda: server_adam(learning_rate=0.1, beta1=0.8, beta2=0.95, tau=0.01)),
        ("yogi", lambda: server_yogi(learning_rate=0.1, beta1=0.8, beta2=0.95, tau=0.01)),
        ("adagrad", lambda: server_adagrad(learning_rate=0.1, beta1=0.8, tau=0.01)),
    ],
)
def test_adaptive_optimizers_match_the_reference_for_three_rounds(
    rule: str, make: Callable[[], Transform]
) -> None:
    beta2 = 0.0 if rule == "adagrad" else 0.95
    expected = reference(rule, DELTAS, eta=0.1, b1=0.8, b2=beta2, tau=0.01)
    for step, want in zip(run(make(), DELTAS), expected, strict=True):
        np.testing.assert_allclose(step, want, rtol=2e-6, atol=1e-9)


def test_adam_first_step_by_hand() -> None:
    # Δ = 1: m = 0.1, v = 0.99 τ² + 0.01 = 0.01000099, step = 0.01 · 0.1 / (0.100004950 + 0.001).
    step, _ = server_adam().update(
        np.ones(1, np.float32), server_adam().init(np.zeros(1, np.float32))
    )
    assert step[0] == pytest.approx(0.001 / (math.sqrt(0.01000099) + 0.001), rel=1e-6)
    assert step[0] == pytest.approx(0.0099005, rel=1e-4)


def test_yogi_second_moment_moves_additively_toward_delta_squared() -> None:
    optimizer = server_yogi(beta2=0.9, tau=1.0)  # v starts at τ² = 1
    state = optimizer.init(np.zeros(3, np.float32))
    _, state = optimizer.update(np.array([3.0, 0.5, 1.0], np.float32), state)
    # Δ² = 9 > v: v grows by 0.1·9; Δ² = 0.25 < v: v shrinks by 0.1·0.25; Δ² = v: unchanged.
    np.testing.assert_allclose(state.second_moment, [1.9, 0.975, 1.0], rtol=1e-6)


def test_adagrad_defaults_to_no_momentum_and_keeps_summing() -> None:
    optimizer = server_adagrad(learning_rate=1.0, tau=1e-3)
    state = optimizer.init(np.zeros(1, np.float32))
    for delta in (2.0, 2.0):
        step, state = optimizer.update(np.array([delta], np.float32), state)
    np.testing.assert_allclose(state.first_moment, [2.0])
    np.testing.assert_allclose(state.second_moment, [1e-6 + 8.0], rtol=1e-6)
    assert step[0] == pytest.approx(2.0 / (math.sqrt(8.0 + 1e-6) + 1e-3), rel=1e-6)


OPTIMIZERS = {
    "sgd": lambda: server_sgd(),
    "sgd_momentum": lambda: server_sgd(momentum=0.9),
    "adam": lambda: server_adam(),
    "yogi": lambda: server_yogi(),
    "adagrad": lambda: server_adagrad(beta1=0.5),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_round_trips_through_tree_leaves(name: str) -> None:
    optimizer = OPTIMIZERS[name]()
    params = np.zeros(4, np.float32)
    state = optimizer.init(params)
    for delta in DELTAS[:2]:
        _, state = optimizer.update(delta, state)
    saved = [leaf.copy() for leaf in tree_leaves(state)]
    restored = tree_unflatten(optimizer.init(params), saved)
    assert type(restored) is type(state)
    continued, _ = optimizer.update(DELTAS[2], state)
    resumed, _ = optimizer.update(DELTAS[2], restored)
    np.testing.assert_array_equal(resumed, continued)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_leaves_the_previous_state_intact(name: str) -> None:
    optimizer = OPTIMIZERS[name]()
    state = optimizer.init(np.zeros(4, np.float32))
    _, state = optimizer.update(DELTAS[0], state)
    before = [leaf.copy() for leaf in tree_leaves(state)]
    first, _ = optimizer.update(DELTAS[1], state)
    again, _ = optimizer.update(DELTAS[1], state)
    np.testing.assert_array_equal(first, again)
    for leaf, saved in zip(tree_leaves(state), before, strict=True):
        np.testing.assert_array_equal(leaf, saved)


def test_state_types() -> None:
    params = np.zeros(2, np.float32)
    assert server_sgd().init(params) == SgdState(momentum=None)
    assert isinstance(server_sgd(momentum=0.5).init(params).momentum, np.ndarray)
    adam_state = server_adam(tau=0.1).init(params)
    assert isinstance(adam_state, AdaptiveState)
    np.testing.assert_allclose(adam_state.second_moment, [0.01, 0.01])
    assert adam_state.first_moment.dtype == adam_state.second_moment.dtype == np.float32


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_empty_parameter_vectors(name: str) -> None:
    steps = run(OPTIMIZERS[name](), [np.zeros(0, np.float32)] * 2)
    assert steps[-1].shape == (0,)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize(
    ("delta", "message"),
    [
        (np.array([1, np.nan, 0, 0], np.float32), "NaN"),
        (np.array([1, 0, np.inf, 0], np.float32), "NaN or infinite"),
        (np.ones(4, np.float64), "float32"),
        (np.ones((2, 2), np.float32), "1-D"),
    ],
)
def test_bad_pseudo_gradients_raise(name: str, delta: np.ndarray, message: str) -> None:
    optimizer = OPTIMIZERS[name]()
    with pytest.raises(StrategyError, match=message):
        optimizer.update(delta, optimizer.init(np.zeros(4, np.float32)))


@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "yogi", "adagrad"])
def test_a_pseudo_gradient_of_the_wrong_length_raises(name: str) -> None:
    optimizer = OPTIMIZERS[name]()
    with pytest.raises(StrategyError, match="3 values, the optimizer state 4"):
        optimizer.update(np.ones(3, np.float32), optimizer.init(np.zeros(4, np.float32)))


BAD_SETTINGS: list[tuple[Callable[..., Transform], dict[str, object], str]] = [
    (server_sgd, {"learning_rate": 0.0}, "learning_rate"),
    (server_sgd, {"learning_rate": -1.0}, "learning_rate"),
    (server_sgd, {"learning_rate": float("nan")}, "learning_rate"),
    (server_sgd, {"learning_rate": float("inf")}, "learning_rate"),
    (server_sgd, {"learning_rate": True}, "learning_rate"),
    (server_sgd, {"momentum": 1.0}, "momentum"),
    (server_sgd, {"momentum": -0.1}, "momentum"),
    (server_adam, {"beta1": 1.0}, "beta1"),
    (server_adam, {"beta2": 1.5}, "beta2"),
    (server_adam, {"tau": 0.0}, "tau"),
    (server_yogi, {"tau": -1e-3}, "tau"),
    (server_yogi, {"beta2": "0.9"}, "beta2"),
    (server_adagrad, {"beta1": -0.5}, "beta1"),
    (server_adagrad, {"learning_rate": None}, "learning_rate"),
]


@pytest.mark.parametrize(("make", "settings_", "name"), BAD_SETTINGS)
def test_bad_settings_raise(
    make: Callable[..., Transform], settings_: dict[str, object], name: str
) -> None:
    with pytest.raises(StrategyError, match=name):
        make(**settings_)


def test_numeric_settings_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        server_sgd(1.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        server_adam(0.01)  # type: ignore[call-arg]
