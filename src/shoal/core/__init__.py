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
from shoal.core.parameters import (
    Layout,
    Parameters,
    TensorSpec,
    Vector,
    all_finite,
    stack_vectors,
)
from shoal.core.torch_interop import parameters_from_state_dict, state_dict_from_parameters
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
    "all_finite",
    "chain",
    "identity",
    "map_updates",
    "parameters_from_state_dict",
    "stack_vectors",
    "state_dict_from_parameters",
    "tree_leaves",
    "tree_unflatten",
]
