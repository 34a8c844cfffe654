"""Server optimizers: transforms from the aggregated client delta to the server's step.

Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2). The
input to ``update`` is the pseudo-gradient Δ, the aggregated client delta
(local minus global), so it already points downhill; the returned
``updates`` is the step to ADD to the global parameters::

    state = optimizer.init(global_vector)
    step, state = optimizer.update(delta, state)
    global_vector = global_vector + step

With m_{-1} = 0 and v_{-1} = τ² (the paper's v_{-1} >= τ²):

    m = β1 m + (1 - β1) Δ
    Adam     v = β2 v + (1 - β2) Δ²
    Yogi     v = v - (1 - β2) Δ² sign(v - Δ²)
    Adagrad  v = v + Δ²
    step = η m / (sqrt(v) + τ)

As in the paper there is no bias correction: τ, not a 1 / (1 - β^t)
factor, keeps the first steps bounded. Server SGD is FedAvg (η = 1, no
momentum) and FedAvgM (Hsu et al. 2019: m = β m + Δ, step = η m). States
are NamedTuples of float32 arrays, so ``tree_leaves`` / ``tree_unflatten``
persist them; every update returns new arrays and leaves the old state intact.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Protocol

import numpy as np

from shoal.core.errors import StrategyError
from shoal.core.parameters import Vector
from shoal.core.transforms import Transform, TransformResult, TransformState


class SecondMomentRule(Protocol):
    """How an adaptive optimizer updates its second moment v from Δ."""

    def __call__(self, second_moment: Vector, delta: Vector, *, beta2: float) -> Vector: ...


class SgdState(NamedTuple):
    """Server SGD's state: the momentum buffer, or None without momentum."""

    momentum: Vector | None


class AdaptiveState(NamedTuple):
    """The first and second moment estimates of Adam, Yogi and Adagrad."""

    first_moment: Vector
    second_moment: Vector


# --- the math, as pure functions ----------------------------------------------


def adam_second_moment(second_moment: Vector, delta: Vector, *, beta2: float) -> Vector:
    """v = β2 v + (1 - β2) Δ²."""
    updated = np.float32(beta2) * second_moment + np.float32(1 - beta2) * np.square(delta)
    return updated.astype(np.float32, copy=False)


def yogi_second_moment(second_moment: Vector, delta: Vector, *, beta2: float) -> Vector:
    """v = v - (1 - β2) Δ² sign(v - Δ²): additive, so v adapts gently to large Δ."""
    squared = np.square(delta)
    updated = second_moment - np.float32(1 - beta2) * squared * np.sign(second_moment - squared)
    return updated.astype(np.float32, copy=False)


def adagrad_second_moment(second_moment: Vector, delta: Vector, *, beta2: float) -> Vector:
    """v = v + Δ² (``beta2`` is unused: Adagrad never forgets)."""
    del beta2
    return (second_moment + np.square(delta)).astype(np.float32, copy=False)


def adaptive_step(
    first_moment: Vector, second_moment: Vector, *, learning_rate: float, tau: float
) -> Vector:
    """step = η m / (sqrt(v) + τ)."""
    step = np.float32(learning_rate) * first_moment / (np.sqrt(second_moment) + np.float32(tau))
    return step.astype(np.float32, copy=False)


# --- validation -----------------------------------------------------------------


def _check_real(name: str, value: object, *, low: float, high: float, open_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise StrategyError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    above_low = number > low if open_low else number >= low
    if not (math.isfinite(number) and above_low and number < high):
        left = "(" if open_low else "["
        raise StrategyError(f"{name} must lie in {left}{low}, {high}), got {number}")
    return number


def _check_learning_rate(value: object) -> float:
    return _check_real("learning_rate", value, low=0.0, high=math.inf, open_low=True)


def _check_decay(name: str, value: object) -> float:
    return _check_real(name, value, low=0.0, high=1.0, open_low=False)


def _check_tau(value: object) -> float:
    return _check_real("tau", value, low=0.0, high=math.inf, open_low=True)


def _check_delta(delta: Vector, like: Vector | None) -> None:
    if not isinstance(delta, np.ndarray) or delta.dtype != np.float32 or delta.ndim != 1:
        raise StrategyError("the server optimizer needs a 1-D float32 pseudo-gradient")
    if like is not None and delta.shape != like.shape:
        raise StrategyError(
            f"pseudo-gradient has {delta.size} values, the optimizer state {like.size}"
        )
    if not np.isfinite(delta).all():
        raise StrategyError("the pseudo-gradient holds NaN or infinite values")


def _zeros_like(params: Vector) -> Vector:
    return np.zeros(np.shape(params), dtype=np.float32)


# --- the transforms -------------------------------------------------------------


def server_sgd(*, learning_rate: float = 1.0, momentum: float = 0.0) -> Transform:
    """Server SGD: step = η Δ, or with momentum m = β m + Δ, step = η m.

    ``learning_rate=1, momentum=0`` is FedAvg: the step is Δ itself, bit for
    bit. With momentum it is FedAvgM.
    """
    rate = _check_learning_rate(learning_rate)
    decay = _check_decay("momentum", momentum)

    def init(params: Vector) -> TransformState:
        return SgdState(_zeros_like(params) if decay else None)

    def update(
        updates: Vector, state: TransformState, params: Vector | None = None
    ) -> TransformResult:
        del params
        _check_delta(updates, state.momentum)
        if state.momentum is None:
            return TransformResult(updates * np.float32(rate), state)
        momentum_buffer = state.momentum * np.float32(decay) + updates
        return TransformResult(momentum_buffer * np.float32(rate), SgdState(momentum_buffer))

    return Transform(init, update)


def _adaptive(
    rule: SecondMomentRule, *, learning_rate: float, beta1: float, beta2: float, tau: float
) -> Transform:
    rate = _check_learning_rate(learning_rate)
    decay1, decay2 = _check_decay("beta1", beta1), _check_decay("beta2", beta2)
    offset = _check_tau(tau)

    def init(params: Vector) -> TransformState:
        second = np.full(np.shape(params), np.float32(offset) ** 2, dtype=np.float32)
        return AdaptiveState(_zeros_like(params), second)

    def update(
        updates: Vector, state: TransformState, params: Vector | None = None
    ) -> TransformResult:
        del params
        _check_delta(updates, state.first_moment)
        first = state.first_moment * np.float32(decay1) + np.float32(1 - decay1) * updates
        second = rule(state.second_moment, updates, beta2=decay2)
        step = adaptive_step(first, second, learning_rate=rate, tau=offset)
        return TransformResult(step, AdaptiveState(first, second))

    return Transform(init, update)


def server_adam(
    *, learning_rate: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> Transform:
    """FedAdam's server step (no bias correction, as in Reddi et al.)."""
    return _adaptive(
        adam_second_moment, learning_rate=learning_rate, beta1=beta1, beta2=beta2, tau=tau
    )


def server_yogi(
    *, learning_rate: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> Transform:
    """FedYogi's server step (no bias correction, as in Reddi et al.)."""
    return _adaptive(
        yogi_second_moment, learning_rate=learning_rate, beta1=beta1, beta2=beta2, tau=tau
    )


def server_adagrad(
    *, learning_rate: float = 1e-1, beta1: float = 0.0, tau: float = 1e-3
) -> Transform:
    """FedAdagrad's server step (no bias correction, as in Reddi et al.).

    ``beta1=0`` (the default) is plain Adagrad on Δ; Algorithm 2 of the paper
    also allows momentum through ``beta1``.
    """
    return _adaptive(
        adagrad_second_moment, learning_rate=learning_rate, beta1=beta1, beta2=0.0, tau=tau
    )
