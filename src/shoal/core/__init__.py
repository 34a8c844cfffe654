"""Shoal's core: parameters, update transforms and the error hierarchy."""

from shoal.core.errors import (
    ClientError,
    ConfigError,
    DataError,
    IllegalTransition,
    IntegrityError,
    MissingExtraError,
    ModelError,
    ProtocolError,
    RunError,
    ShoalError,
    StrategyError,
)
from shoal.core.parameters import Layout, Parameters, TensorSpec, Vector, stack_vectors
from shoal.core.transforms import (
    Transform,
    TransformResult,
    chain,
    identity,
    map_updates,
    tree_leaves,
    tree_unflatten,
)

__all__ = [
    "ClientError",
    "ConfigError",
    "DataError",
    "IllegalTransition",
    "IntegrityError",
    "Layout",
    "MissingExtraError",
    "ModelError",
    "Parameters",
    "ProtocolError",
    "RunError",
    "ShoalError",
    "StrategyError",
    "TensorSpec",
    "Transform",
    "TransformResult",
    "Vector",
    "chain",
    "identity",
    "map_updates",
    "stack_vectors",
    "tree_leaves",
    "tree_unflatten",
]
