"""Composable update transforms: a pure ``init`` / ``update`` pair with explicit state.

A transform maps an update vector (a client's delta, or the server's
pseudo-gradient) to a new update vector, carrying whatever state it needs
(momentum, adaptive moments, a random generator) explicitly. ``chain``
composes transforms into a pipeline; the same mechanism serves the client
side (clip, noise, quantize, encode) and the server side (optimizers).

>>> double = map_updates(lambda updates: 2 * updates)
>>> pipeline = chain(double, double)
>>> state = pipeline.init(np.zeros(3, np.float32))
>>> pipeline.update(np.ones(3, np.float32), state).updates
array([4., 4., 4.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
import safetensors
import safetensors.numpy

from shoal.core.errors import ModelError

Vector = npt.NDArray[np.float32]
TransformState = Any


class TransformResult(NamedTuple):
    """What ``update`` returns: the transformed updates and the next state."""

    updates: Vector
    state: TransformState


class InitFn(Protocol):
    def __call__(self, params: Vector, /) -> TransformState: ...


class UpdateFn(Protocol):
    def __call__(
        self, updates: Vector, state: TransformState, params: Vector | None = None, /
    ) -> TransformResult: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Transform:
    """A pure update transform: ``init(params) -> state`` and ``update(u, state, params)``."""

    init: InitFn
    update: UpdateFn


def identity() -> Transform:
    """The transform that passes updates through unchanged."""
    return map_updates(lambda updates: updates)


def chain(*transforms: Transform) -> Transform:
    """Apply transforms in sequence; the state is the tuple of their states."""

    def init(params: Vector) -> TransformState:
        return tuple(transform.init(params) for transform in transforms)

    def update(
        updates: Vector, state: TransformState, params: Vector | None = None
    ) -> TransformResult:
        if len(state) != len(transforms):
            raise ModelError(f"chain of {len(transforms)} transforms got {len(state)} states")
        new_states = []
        for transform, inner_state in zip(transforms, state, strict=True):
            updates, inner_state = transform.update(updates, inner_state, params)
            new_states.append(inner_state)
        return TransformResult(updates, tuple(new_states))

    return Transform(init, update)


def map_updates(function: Callable[[Vector], Vector]) -> Transform:
    """A stateless transform applying ``function`` to the update vector."""

    def init(params: Vector) -> TransformState:
        del params
        return ()

    def update(
        updates: Vector, state: TransformState, params: Vector | None = None
    ) -> TransformResult:
        del params
        return TransformResult(function(updates), state)

    return Transform(init, update)


# --- state persistence -------------------------------------------------------
#
# A transform's state is a tree of tuples, NamedTuples and frozen dataclasses
# whose leaves are numpy arrays or Python scalars. To persist it we flatten the
# leaves into a list; to restore it we ask ``init`` for a template of the same
# structure and pour the saved leaves back in. No pickle, no string keys.


def tree_leaves(state: TransformState) -> list[np.ndarray]:
    """The leaves of a state tree, in a fixed depth-first order, as arrays."""
    leaves: list[np.ndarray] = []
    _collect(state, leaves)
    return leaves


def _collect(node: Any, leaves: list[np.ndarray]) -> None:
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for field in dataclasses.fields(node):
            _collect(getattr(node, field.name), leaves)
    elif isinstance(node, tuple | list):
        for child in node:
            _collect(child, leaves)
    elif isinstance(node, np.ndarray | np.generic | int | float | bool):
        leaves.append(np.asarray(node))
    elif node is None:
        return
    else:
        raise ModelError(f"transform state holds an unsupported leaf of type {type(node).__name__}")


def tree_unflatten(template: TransformState, leaves: Sequence[np.ndarray]) -> TransformState:
    """Rebuild a state shaped like ``template`` from leaves made by ``tree_leaves``."""
    remaining = list(leaves)
    rebuilt = _fill(template, remaining)
    if remaining:
        raise ModelError(f"{len(remaining)} saved state leaves were not used")
    return rebuilt


def _fill(node: Any, remaining: list[np.ndarray]) -> Any:
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        values = {
            field.name: _fill(getattr(node, field.name), remaining)
            for field in dataclasses.fields(node)
        }
        return dataclasses.replace(node, **values)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_fill(child, remaining) for child in node))
    if isinstance(node, tuple | list):
        return type(node)(_fill(child, remaining) for child in node)
    if node is None:
        return None
    if not remaining:
        raise ModelError("saved state has fewer leaves than the transform expects")
    leaf = remaining.pop(0)
    if isinstance(node, np.ndarray):
        if leaf.shape != node.shape:
            raise ModelError(f"saved state leaf has shape {leaf.shape}, expected {node.shape}")
        return leaf.astype(node.dtype, copy=False)
    if isinstance(node, bool):
        return bool(leaf)
    if isinstance(node, int):
        return int(leaf)
    if isinstance(node, float):
        return float(leaf)
    return leaf.astype(np.asarray(node).dtype)


def state_to_bytes(state: TransformState) -> bytes:
    """A transform state as safetensors bytes: its leaves, in order."""
    leaves = {
        f"leaf_{index:05d}": np.ascontiguousarray(leaf)
        for index, leaf in enumerate(tree_leaves(state))
    }
    return safetensors.numpy.save(leaves)


def state_from_bytes(template: TransformState, data: bytes) -> TransformState:
    """Rebuild a state shaped like ``template`` from :func:`state_to_bytes` output."""
    try:
        tensors = safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError) as exc:
        raise ModelError(f"unreadable transform state: {exc}") from exc
    try:
        leaves = [tensors[f"leaf_{index:05d}"] for index in range(len(tensors))]
    except KeyError as exc:
        raise ModelError(f"transform state lacks leaf {exc}") from exc
    return tree_unflatten(template, leaves)
