"""Convert between PyTorch state dicts and Shoal's flat :class:`Parameters`.

Every entry of the state dict travels, buffers included (BatchNorm's running
statistics and its int64 ``num_batches_tracked``): the flat vector is
float32 and the layout remembers each tensor's dtype and shape. An entry
that is not floating point is not trained: an update leaves it as it was
(:attr:`~shoal.core.parameters.Layout.untrained`). PyTorch is
imported inside the functions, so this module imports without it; calling
them without PyTorch raises :class:`MissingExtraError`.

>>> import torch
>>> params = parameters_from_state_dict(torch.nn.Linear(3, 2).state_dict())
>>> params.layout.names
('weight', 'bias')
>>> restored = state_dict_from_parameters(params)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from shoal.core.errors import MissingExtraError, ModelError
from shoal.core.parameters import Parameters

if TYPE_CHECKING:
    import torch


def import_torch(feature: str) -> ModuleType:
    """The ``torch`` module, or :class:`MissingExtraError` naming ``feature`` and the extra."""
    try:
        import torch
    except ImportError as exc:
        raise MissingExtraError(extra="torch", package="torch", feature=feature) from exc
    return torch


def parameters_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, statistics: Iterable[str] = ()
) -> Parameters:
    """Flatten a state dict (any device, any real dtype) into :class:`Parameters`, in its order.

    Tensors numpy cannot hold (bfloat16) are stored as float32 and recorded
    as float32; pass ``like`` to :func:`state_dict_from_parameters` to get
    their dtype back. ``statistics`` names the entries that are measured,
    not trained (:func:`module_statistics`: BatchNorm's running mean and
    variance): the coordinator averages them and steps them by no server
    optimizer.
    """
    torch = import_torch("converting a PyTorch state dict")
    arrays = []
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelError(
                f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor"
            )
        if tensor.is_complex():
            raise ModelError(f"state dict entry {name!r} is complex ({tensor.dtype})")
        plain = tensor.detach().cpu()
        if plain.dtype == torch.bfloat16:
            plain = plain.float()
        arrays.append(plain.numpy())
    parameters = Parameters.from_arrays(arrays, names=list(state_dict.keys()))
    marked = set(statistics)
    if not marked:
        return parameters
    unknown = sorted(marked - set(state_dict))
    if unknown:
        raise ModelError(f"statistics {unknown[:5]} are not entries of the state dict")
    return Parameters(parameters.vector, parameters.layout.with_statistics(marked))


def module_statistics(module: torch.nn.Module) -> list[str]:
    """The state dict entries of ``module`` that are floating-point buffers: what training
    measures (BatchNorm's running mean and variance) rather than what it descends."""
    state = module.state_dict()
    return [
        name
        for name, buffer in module.named_buffers()
        if name in state and buffer.is_floating_point()
    ]


def state_dict_from_parameters(
    parameters: Parameters, like: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors (copies) in the dtypes and shapes the layout records.

    With ``like`` (e.g. ``module.state_dict()``), the result has its keys in
    its order, and each tensor its dtype and device; a missing or extra name
    or a different shape raises :class:`ModelError`.
    """
    torch = import_torch("converting parameters to a PyTorch state dict")
    tensors = {
        spec.name: torch.from_numpy(np.array(array, copy=True))
        for spec, array in zip(parameters.layout.specs, parameters.to_arrays(), strict=True)
    }
    if like is None:
        return tensors
    _check_same_entries(tensors, like)
    return {
        name: tensors[name].to(dtype=reference.dtype, device=reference.device)
        for name, reference in like.items()
    }


def _check_same_entries(
    tensors: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
) -> None:
    missing = [name for name in like if name not in tensors]
    extra = [name for name in tensors if name not in like]
    if missing or extra:
        raise ModelError(
            f"parameters do not match the state dict: missing {missing}, extra {extra}"
        )
    for name, reference in like.items():
        if tuple(tensors[name].shape) != tuple(reference.shape):
            raise ModelError(
                f"tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"the state dict has {tuple(reference.shape)}"
            )
