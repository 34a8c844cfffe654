"""Shoal's core: parameters, update transforms, upload codecs, client ids and the error
hierarchy."""

from shoal.core.compression import Compression
from shoal.core.device import DeviceState
from shoal.core.errors import (
    BusyError,
    ClientError,
    ConfigError,
    DataError,
    IllegalTransition,
    IntegrityError,
    MissingExtraError,
    ModelError,
    NotFoundError,
    ProtocolError,
    RegistryError,
    RunError,
    SecurityError,
    ShoalError,
    StrategyError,
    TransportError,
)
from shoal.core.identifiers import (
    CLIENT_ID_PATTERN,
    MAX_CLIENT_ID_CHARS,
    check_client_id,
    is_client_id,
)
from shoal.core.parameters import (
    Layout,
    Parameters,
    TensorSpec,
    Vector,
    all_finite,
    all_within,
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
    "CLIENT_ID_PATTERN",
    "MAX_CLIENT_ID_CHARS",
    "BusyError",
    "ClientError",
    "Compression",
    "ConfigError",
    "DataError",
    "DeviceState",
    "IllegalTransition",
    "IntegrityError",
    "Layout",
    "MissingExtraError",
    "ModelError",
    "NotFoundError",
    "Parameters",
    "ProtocolError",
    "RegistryError",
    "RunError",
    "SecurityError",
    "ShoalError",
    "StrategyError",
    "TensorSpec",
    "Transform",
    "TransformResult",
    "TransportError",
    "Vector",
    "all_finite",
    "all_within",
    "chain",
    "check_client_id",
    "identity",
    "is_client_id",
    "map_updates",
    "parameters_from_state_dict",
    "stack_vectors",
    "state_dict_from_parameters",
    "tree_leaves",
    "tree_unflatten",
]
