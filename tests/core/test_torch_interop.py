"""Tests of the conversions between PyTorch state dicts and flat parameters."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from shoal.core.errors import MissingExtraError, ModelError
from shoal.core.torch_interop import (
    import_torch,
    parameters_from_state_dict,
    state_dict_from_parameters,
)


def batchnorm_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU(), torch.nn.Linear(3, 2)
    )
    net.train()
    net(torch.randn(8, 4))  # move the running statistics and num_batches_tracked
    return net


def test_round_trip_keeps_every_entry_with_its_dtype_and_shape() -> None:
    state = batchnorm_net().state_dict()
    params = parameters_from_state_dict(state)
    assert params.layout.names == tuple(state.keys())
    assert params.views()["1.num_batches_tracked"].item() == 1.0
    for restored in (
        state_dict_from_parameters(params),
        state_dict_from_parameters(params, like=state),
    ):
        assert list(restored) == list(state)
        for name, tensor in state.items():
            assert restored[name].dtype == tensor.dtype
            assert restored[name].shape == tensor.shape
            assert torch.equal(restored[name], tensor)
    assert state_dict_from_parameters(params)["1.num_batches_tracked"].dtype == torch.int64


def test_state_dict_loads_back_into_a_module() -> None:
    source, target = (
        batchnorm_net(),
        torch.nn.Sequential(
            torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU(), torch.nn.Linear(3, 2)
        ),
    )
    params = parameters_from_state_dict(source.state_dict())
    target.load_state_dict(state_dict_from_parameters(params, like=target.state_dict()))
    source.eval()
    target.eval()
    probe = torch.randn(5, 4)
    assert torch.equal(source(probe), target(probe))


def test_tensors_are_copies_of_the_vector() -> None:
    params = parameters_from_state_dict({"w": torch.ones(2, 2)})
    restored = state_dict_from_parameters(params)
    restored["w"].add_(1.0)
    np.testing.assert_array_equal(params.vector, np.ones(4, np.float32))


def test_gradients_and_odd_dtypes_are_handled() -> None:
    state = {
        "weight": torch.ones(2, 3, requires_grad=True),
        "double": torch.full((2,), 0.5, dtype=torch.float64),
        "half": torch.full((3,), 2.0, dtype=torch.float16),
        "mask": torch.tensor([True, False]),
        "brain": torch.full((2,), 1.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
    }
    params = parameters_from_state_dict(state)
    assert params.layout.size == 6 + 2 + 3 + 2 + 2 + 0
    restored = state_dict_from_parameters(params, like=state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name], tensor.detach())
    assert state_dict_from_parameters(params)["brain"].dtype == torch.float32


def test_mismatched_like_is_refused() -> None:
    params = parameters_from_state_dict({"w": torch.ones(2, 3), "b": torch.zeros(3)})
    with pytest.raises(ModelError, match="missing"):
        state_dict_from_parameters(params, like={"w": torch.ones(2, 3)})
    with pytest.raises(ModelError, match="missing"):
        state_dict_from_parameters(params, like={"w": torch.ones(2, 3), "c": torch.zeros(3)})
    with pytest.raises(ModelError, match="shape"):
        state_dict_from_parameters(params, like={"w": torch.ones(3, 2), "b": torch.zeros(3)})


def test_non_tensor_entries_are_refused() -> None:
    with pytest.raises(ModelError, match="not a tensor"):
        parameters_from_state_dict({"w": np.ones(2)})  # type: ignore[dict-item]
    with pytest.raises(ModelError, match="complex"):
        parameters_from_state_dict({"w": torch.ones(2, dtype=torch.complex64)})


def test_empty_state_dict_round_trips() -> None:
    params = parameters_from_state_dict({})
    assert len(params) == 0
    assert state_dict_from_parameters(params) == {}


def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"shoal\[torch\]"):
        import_torch("testing")
    with pytest.raises(MissingExtraError, match="state dict"):
        parameters_from_state_dict({})
