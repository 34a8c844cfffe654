"""Update transforms: chain composes in order, state persists through tree leaves."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

from shoal.core import ModelError, Transform, TransformResult, chain, identity, map_updates
from shoal.core.transforms import tree_leaves, tree_unflatten


class CountState(NamedTuple):
    count: int
    total: np.ndarray


def counting() -> Transform:
    def init(params: np.ndarray) -> CountState:
        return CountState(0, np.zeros_like(params))

    def update(
        updates: np.ndarray, state: CountState, params: np.ndarray | None = None
    ) -> TransformResult:
        return TransformResult(updates, CountState(state.count + 1, state.total + updates))

    return Transform(init, update)


def test_chain_applies_in_order_and_threads_state() -> None:
    pipeline = chain(map_updates(lambda u: u + 1), map_updates(lambda u: u * 3), counting())
    params = np.zeros(2, np.float32)
    state = pipeline.init(params)
    updates, state = pipeline.update(np.ones(2, np.float32), state, params)
    np.testing.assert_array_equal(updates, [6, 6])
    updates, state = pipeline.update(np.zeros(2, np.float32), state, params)
    assert state[2].count == 2
    np.testing.assert_array_equal(state[2].total, [9, 9])


def test_empty_chain_and_identity_pass_through() -> None:
    vector = np.arange(3, dtype=np.float32)
    for transform in (chain(), identity()):
        updates, _ = transform.update(vector, transform.init(vector))
        np.testing.assert_array_equal(updates, vector)


def test_chain_refuses_a_foreign_state() -> None:
    pipeline = chain(identity(), identity())
    with pytest.raises(ModelError):
        pipeline.update(np.zeros(1, np.float32), ((),))


def test_state_round_trips_through_leaves() -> None:
    pipeline = chain(counting(), identity(), counting())
    params = np.zeros(3, np.float32)
    state = pipeline.init(params)
    for _ in range(2):
        _, state = pipeline.update(np.ones(3, np.float32), state, params)
    restored = tree_unflatten(pipeline.init(params), tree_leaves(state))
    assert restored[0].count == 2 and isinstance(restored[0].count, int)
    np.testing.assert_array_equal(restored[2].total, state[2].total)


def test_unflatten_checks_count_and_shapes() -> None:
    template = counting().init(np.zeros(2, np.float32))
    leaves = tree_leaves(template)
    with pytest.raises(ModelError):
        tree_unflatten(template, leaves[:1])
    with pytest.raises(ModelError):
        tree_unflatten(template, [*leaves, np.zeros(1)])
    with pytest.raises(ModelError):
        tree_unflatten(template, [leaves[0], np.zeros(5)])
    with pytest.raises(ModelError):
        tree_leaves(("text",))
