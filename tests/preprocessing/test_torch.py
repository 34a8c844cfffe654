"""A user's TorchClient in both passes: a statistics run counts its loader's records, and a
training run's scaler standardizes every batch the module sees (in training and evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import shoal  # noqa: E402
from shoal.client import TorchClient  # noqa: E402
from shoal.client.app import ClientContext  # noqa: E402
from shoal.core.errors import ClientError  # noqa: E402
from shoal.core.parameters import Parameters  # noqa: E402
from shoal.preprocessing import SCALER_KEY, Scaler, read_statistics  # noqa: E402
from shoal.tasks import EvaluateConfig, FitConfig  # noqa: E402

SCALES = np.array([1000.0, 0.01, 5.0])
CLIENTS = 3


def records(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``index``'s records: three features of very different scales, each client's
    centered elsewhere (its own statistics are not the population's)."""
    rng = np.random.default_rng(index)
    features = rng.normal(index, 1.0, size=(20 + 10 * index, 3)) * SCALES
    return features.astype(np.float32), (features[:, 0] > index * SCALES[0]).astype(np.int64)


class Recorder(torch.nn.Module):  # type: ignore[misc]
    """A linear model that keeps the inputs of its last forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.inputs: list[Any] = []

    def forward(self, inputs: Any) -> Any:
        self.inputs.append(inputs.detach().clone())
        return self.linear(inputs)


def torch_client(context: ClientContext) -> TorchClient:
    features, labels = records(context.partition_index or 0)
    data = torch.utils.data.TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    return TorchClient(
        Recorder(),
        loss_fn=torch.nn.functional.cross_entropy,
        train_loader=loader,
        eval_loader=loader,
    )


def test_a_statistics_run_counts_a_torch_clients_records(tmp_path: Path) -> None:
    job = {
        "run": {"name": "torch-statistics", "rounds": 1},
        "data": {"num_clients": CLIENTS},
        "round": {"clients_per_round": CLIENTS, "over_selection": 1.0, "quorum": 1.0},
        "evaluation": {"every": 0},
        "simulation": {"workers": 0},
        "statistics": {"enabled": True, "low": [-2e4, -0.2, -100.0], "high": [2e4, 0.2, 100.0]},
    }
    shoal.simulate(job, client_app=torch_client, out=tmp_path)
    statistics, _ = read_statistics(tmp_path)
    pooled = np.concatenate([records(index)[0] for index in range(CLIENTS)]).astype(np.float64)
    np.testing.assert_allclose(statistics.mean, pooled.mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(statistics.std, pooled.std(axis=0), rtol=1e-3)


def test_a_tasks_scaler_standardizes_every_batch_the_module_sees() -> None:
    client = torch_client(ClientContext("c", 1, CLIENTS))
    features = client.local_features()
    assert features.shape == (30, 3)  # every record of the loader, as given
    scaler = Scaler(features.mean(axis=0), features.std(axis=0))
    parameters = client.get_parameters()
    module = client.module
    client.fit(parameters, FitConfig(round=1, extras={SCALER_KEY: scaler.text()}))
    seen = torch.cat(module.inputs).double().numpy()
    np.testing.assert_allclose(seen.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(seen.std(axis=0), 1.0, atol=1e-5)
    module.inputs.clear()
    client.evaluate(parameters, EvaluateConfig(round=1, extras={SCALER_KEY: scaler.text()}))
    np.testing.assert_allclose(torch.cat(module.inputs).double().numpy(), seen, atol=1e-5)
    module.inputs.clear()
    client.fit(parameters, FitConfig(round=2))  # a run without a scaler: the records as they are
    np.testing.assert_allclose(torch.cat(module.inputs).numpy(), features, rtol=1e-6)


def test_a_scaler_of_other_features_is_a_client_error() -> None:
    client = torch_client(ClientContext("c", 0, CLIENTS))
    text = Scaler([0.0, 0.0], [1.0, 1.0]).text()
    with pytest.raises(ClientError, match="standardizes 2 features, this client's records have 3"):
        client.fit(client.get_parameters(), FitConfig(round=1, extras={SCALER_KEY: text}))
    assert isinstance(client.get_parameters(), Parameters)


def test_integer_inputs_are_standardized_as_floats() -> None:
    """uint8 pixels and int64 counts: standardized, they are fractions, not integers."""
    for dtype in (torch.uint8, torch.int64):
        client = torch_client(ClientContext("c", 0, CLIENTS))
        inputs = torch.tensor([[0, 255, 10], [255, 0, 20]], dtype=dtype)
        client._scaler = Scaler([127.5, 127.5, 15.0], [127.5, 127.5, 5.0])
        standardized = client._inputs(inputs, torch.device("cpu"))
        assert standardized.dtype == torch.get_default_dtype()
        assert standardized.tolist() == [[-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]
