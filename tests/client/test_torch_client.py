"""Tests of the PyTorch client adapter on scikit-learn's digits."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
from torch.utils.data import DataLoader, TensorDataset

from shoal.client.api import EvaluateConfig, FitConfig, FitResult
from shoal.client.torch_client import TorchClient
from shoal.core.errors import ClientError, MissingExtraError
from shoal.core.parameters import Parameters
from shoal.simulation.datasets import load_digits_split

Loaders = tuple["DataLoader[Any]", "DataLoader[Any]"]


@pytest.fixture(scope="module")
def loaders() -> Loaders:
    train, test = load_digits_split(test_fraction=0.25, seed=0)
    train_set = TensorDataset(
        torch.from_numpy(train.features[:640]), torch.from_numpy(train.labels[:640])
    )
    test_set = TensorDataset(torch.from_numpy(test.features), torch.from_numpy(test.labels))
    return DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(test_set, batch_size=128)


def make_client(loaders: Loaders, **options: object) -> TorchClient:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return TorchClient(
        net,
        loss_fn=torch.nn.functional.cross_entropy,
        train_loader=loaders[0],
        eval_loader=loaders[1],
        **options,  # type: ignore[arg-type]
    )


def vector_of(result: FitResult) -> np.ndarray:
    assert isinstance(result.parameters, Parameters)
    return result.parameters.vector


def test_training_over_a_few_fits_improves_accuracy(loaders: Loaders) -> None:
    client = make_client(loaders)
    parameters = client.get_parameters()
    before = client.evaluate(parameters, EvaluateConfig(round=0))
    for round_number in range(1, 4):
        result = client.fit(
            parameters, FitConfig(round=round_number, learning_rate=0.5, seed=round_number)
        )
        assert isinstance(result.parameters, Parameters)
        parameters = result.parameters
        assert result.num_examples == 640
        assert result.metrics["steps"] == 20.0
    after = client.evaluate(parameters, EvaluateConfig(round=4))
    assert after.num_examples == 450
    assert before.metrics["accuracy"] < 0.3
    assert after.metrics["accuracy"] > 0.85
    assert after.loss < before.loss


def test_parameters_round_trip_through_the_module(loaders: Loaders) -> None:
    client = make_client(loaders)
    start = client.get_parameters()
    assert start.layout.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    shifted = start.with_vector(start.vector + 1.0)
    client.evaluate(shifted, EvaluateConfig(round=0))  # loads the parameters into the module
    np.testing.assert_array_equal(client.get_parameters().vector, shifted.vector)
    bias = client.module.state_dict()["0.bias"]
    assert torch.equal(bias, torch.from_numpy(shifted.views()["0.bias"]))


def test_fit_is_deterministic_in_the_seed(loaders: Loaders) -> None:
    client = make_client(loaders)
    start = client.get_parameters()
    config = FitConfig(round=1, learning_rate=0.1, seed=3)
    state_before = torch.get_rng_state()
    first, again = client.fit(start, config), client.fit(start, config)
    other = client.fit(start, FitConfig(round=1, learning_rate=0.1, seed=4))
    np.testing.assert_array_equal(vector_of(first), vector_of(again))
    assert not np.array_equal(vector_of(first), vector_of(other))
    assert torch.equal(torch.get_rng_state(), state_before)  # the global generator is untouched


def test_loader_with_its_own_generator_is_reseeded(loaders: Loaders) -> None:
    dataset = loaders[0].dataset
    own = DataLoader(
        dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    client = make_client((own, loaders[1]))
    start, config = client.get_parameters(), FitConfig(round=1, learning_rate=0.1, seed=5)
    np.testing.assert_array_equal(
        vector_of(client.fit(start, config)), vector_of(client.fit(start, config))
    )


def test_fractional_epochs_run_that_share_of_the_batches(
    loaders: Loaders,
) -> None:
    client = make_client(loaders)
    start = client.get_parameters()
    assert client.fit(start, FitConfig(round=1, epochs=0.25)).metrics["steps"] == 5.0
    assert client.fit(start, FitConfig(round=1, epochs=0.01)).metrics["steps"] == 1.0
    assert client.fit(start, FitConfig(round=1, epochs=2.5)).metrics["steps"] == 50.0


def test_proximal_term_pulls_toward_the_global_model(
    loaders: Loaders,
) -> None:
    client = make_client(loaders)
    start = client.get_parameters()

    def distance(mu: float) -> float:
        config = FitConfig(round=1, epochs=2, learning_rate=0.05, proximal_mu=mu, seed=1)
        return float(np.linalg.norm(vector_of(client.fit(start, config)) - start.vector))

    free = distance(0.0)
    assert distance(10.0) < 0.25 * free
    assert distance(0.5) < free


def test_custom_optimizer_factory_is_used(loaders: Loaders) -> None:
    calls: list[float] = []

    def adam(parameters: Iterator[torch.nn.Parameter], config: FitConfig) -> torch.optim.Optimizer:
        calls.append(config.learning_rate)
        return torch.optim.Adam(parameters, lr=config.learning_rate)

    client = make_client(loaders, optimizer_factory=adam)
    result = client.fit(client.get_parameters(), FitConfig(round=1, learning_rate=0.01))
    assert calls == [0.01]
    assert result.metrics["loss"] > 0


def test_batchnorm_buffers_travel_with_the_parameters(
    loaders: Loaders,
) -> None:
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 10)
    )
    client = TorchClient(
        net,
        loss_fn=torch.nn.functional.cross_entropy,
        train_loader=loaders[0],
        eval_loader=loaders[1],
    )
    start = client.get_parameters()
    assert start.views()["1.num_batches_tracked"].item() == 0.0
    result = client.fit(start, FitConfig(round=1, epochs=0.5))
    assert isinstance(result.parameters, Parameters)
    assert result.parameters.views()["1.num_batches_tracked"].item() == 10.0
    assert not np.array_equal(
        result.parameters.views()["1.running_mean"], start.views()["1.running_mean"]
    )
    assert net.training  # evaluate restores the training mode
    client.evaluate(result.parameters, EvaluateConfig(round=1))
    assert net.training


def test_evaluate_without_eval_loader_or_classes(loaders: Loaders) -> None:
    no_eval = TorchClient(
        torch.nn.Linear(64, 10), loss_fn=torch.nn.functional.cross_entropy, train_loader=loaders[0]
    )
    assert no_eval.evaluate(no_eval.get_parameters(), EvaluateConfig(round=0)).num_examples == 0
    inputs = torch.randn(20, 3)
    regression = DataLoader(TensorDataset(inputs, inputs.sum(dim=1, keepdim=True)), batch_size=8)
    client = TorchClient(
        torch.nn.Linear(3, 1),
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=regression,
        eval_loader=regression,
    )
    result = client.evaluate(client.get_parameters(), EvaluateConfig(round=0))
    assert result.num_examples == 20
    assert "accuracy" not in result.metrics
    assert result.loss > 0


def test_mismatched_parameters_are_refused(loaders: Loaders) -> None:
    client = make_client(loaders)
    other = make_client(loaders)
    other.module = torch.nn.Linear(64, 10)
    with pytest.raises(ClientError, match="do not fit"):
        client.fit(other.get_parameters(), FitConfig(round=1))


def test_training_errors_become_client_errors(loaders: Loaders) -> None:
    client = TorchClient(
        torch.nn.Linear(5, 10), loss_fn=torch.nn.functional.cross_entropy, train_loader=loaders[0]
    )
    with pytest.raises(ClientError, match="training failed"):
        client.fit(client.get_parameters(), FitConfig(round=1))


def test_empty_train_loader_is_refused() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0)), batch_size=4)
    with pytest.raises(ClientError, match="no batches"):
        TorchClient(
            torch.nn.Linear(3, 2), loss_fn=torch.nn.functional.cross_entropy, train_loader=empty
        )


def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch, loaders: Loaders) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"TorchClient.*shoal\[torch\]"):
        TorchClient(None, loss_fn=None, train_loader=loaders[0])  # type: ignore[arg-type]


def test_set_parameters_loads_them_and_export_state_dict_gives_them_back(
    loaders: Loaders,
) -> None:
    client = make_client(loaders)
    start = client.get_parameters()
    shifted = start.with_vector(start.vector + 0.5)
    client.set_parameters(shifted)
    np.testing.assert_array_equal(client.get_parameters().vector, shifted.vector)
    state = client.export_state_dict()
    assert tuple(state) == shifted.layout.names
    for spec, array in zip(shifted.layout.specs, shifted.to_arrays(), strict=True):
        assert tuple(state[spec.name].shape) == spec.shape
        assert state[spec.name].device.type == "cpu"
        np.testing.assert_array_equal(state[spec.name].numpy(), array)
    state["0.bias"].add_(1.0)  # a copy: the module is untouched
    np.testing.assert_array_equal(client.get_parameters().vector, shifted.vector)


def test_an_exported_state_dict_loads_into_a_fresh_module(loaders: Loaders, tmp_path: Path) -> None:
    client = make_client(loaders)
    result = client.fit(client.get_parameters(), FitConfig(round=1, learning_rate=0.5, seed=1))
    assert isinstance(result.parameters, Parameters)
    client.set_parameters(result.parameters)
    torch.save(client.export_state_dict(), tmp_path / "model.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    inputs = torch.from_numpy(load_digits_split(test_fraction=0.25, seed=0)[1].features[:8])
    with torch.no_grad():
        assert torch.equal(fresh(inputs), client.module(inputs))


def test_export_state_dict_keeps_buffers_and_their_dtypes(loaders: Loaders) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16))
    client = TorchClient(net, loss_fn=torch.nn.functional.cross_entropy, train_loader=loaders[0])
    state = client.export_state_dict()
    assert list(state) == list(net.state_dict())
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert state["1.running_var"].dtype == torch.float32


def test_set_parameters_refuses_another_layout_and_keeps_the_module(loaders: Loaders) -> None:
    client = make_client(loaders)
    before = client.get_parameters()
    other = Parameters.from_arrays(
        [np.zeros((10, 64), np.float32), np.zeros(10, np.float32)], names=["weight", "bias"]
    )
    with pytest.raises(ClientError, match="do not fit the module"):
        client.set_parameters(other)
    wrong_shape = Parameters.from_arrays(
        [np.zeros(shape, np.float32) for shape in [(32, 64), (32,), (10, 31), (10,)]],
        names=list(before.layout.names),
    )
    with pytest.raises(ClientError, match="shape"):
        client.set_parameters(wrong_shape)
    np.testing.assert_array_equal(client.get_parameters().vector, before.vector)


def test_a_client_without_train_loader_only_evaluates(loaders: Loaders) -> None:
    torch.manual_seed(0)
    evaluator = TorchClient(
        torch.nn.Linear(64, 10), loss_fn=torch.nn.functional.cross_entropy, eval_loader=loaders[1]
    )
    parameters = evaluator.get_parameters()
    result = evaluator.evaluate(parameters, EvaluateConfig(round=3))
    assert result.num_examples == 450
    assert 0 <= result.metrics["accuracy"] <= 1
    with pytest.raises(ClientError, match="no train loader"):
        evaluator.fit(parameters, FitConfig(round=1))
