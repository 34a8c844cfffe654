"""A user's PyTorch model with BatchNorm: its counter is not trained, its statistics averaged.

``num_batches_tracked`` counts the batches a client trained on: its "update" was the
round's step count (136 after 136 batches), which dominated the update's L2 norm. The
default policy (an L2 bound of 100) refused every honest update of such a model, DP's
clip spent itself on the counter, SecAgg+'s clip capped it, and the divergence and drift
measures measured it. Reproduced with a two-layer model and batches of two.

The running mean and variance were stepped by the server optimizer as weights are: FedAdam
moved them by its learning rate whatever the clients measured, and a momentum carried past
steps into them (FedAvgM drove a CNN's running variance to -0.84: NaN at evaluation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal import simulate
from shoal.aggregation import make_strategy
from shoal.client.api import FitConfig, fit_update
from shoal.client.app import ClientContext
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.events import RoundClosed, SendFitTask, StartRound, UpdateReceived
from shoal.coordinator.rounds import RoundSettings
from shoal.core.errors import ModelError
from shoal.core.parameters import Layout, Parameters, TensorSpec, untrained_zeroed
from shoal.tasks import Phase

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from shoal.client.torch_client import TorchClient  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def make_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def client_fn(context: ClientContext) -> TorchClient:
    rng = np.random.default_rng(context.partition_index or 0)
    features = rng.normal(size=(300, 8)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64)
    data = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    generator = torch.Generator().manual_seed(context.partition_index or 0)
    loader = DataLoader(data, batch_size=2, shuffle=True, generator=generator)  # 150 batches
    return TorchClient(
        make_model(), loss_fn=functional.cross_entropy, train_loader=loader, eval_loader=loader
    )


def job(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    base: dict[str, dict[str, Any]] = {
        "run": {"rounds": 2},
        "data": {"num_clients": 3},
        "round": {"clients_per_round": 3, "over_selection": 1.0},
        "client": {"epochs": 1, "learning_rate": 0.05},
        "evaluation": {"every": 0},
        "simulation": {"workers": 0},
    }
    for name, section in sections.items():
        base[name] = base.get(name, {}) | section
    return base


def counters(parameters: Parameters) -> list[float]:
    return [
        float(view.item()) for name, view in parameters.views().items() if "num_batches" in name
    ]


def test_an_update_leaves_integer_tensors_as_they_were() -> None:
    client = client_fn(ClientContext(client_id="c", partition_index=0, num_partitions=1))
    start = client.get_parameters()
    result = client.fit(start, FitConfig(round=1, epochs=1, learning_rate=0.05))
    assert counters(result.parameters) == [150.0]  # the client's own module counted its batches
    update = fit_update(result, start)
    assert counters(update) == [0.0]  # and its update does not
    layout = start.layout
    (span,) = layout.untrained
    assert layout.names[[s for s, _ in layout.offsets()].index(span[0])] == "1.num_batches_tracked"
    assert np.linalg.norm(update.vector) < 50  # the counter alone was 150


def test_a_layouts_untrained_tensors_are_its_integers_and_booleans() -> None:
    layout = Layout(
        (
            TensorSpec("w", (2,), "float32"),
            TensorSpec("count", (), "int64"),
            TensorSpec("mask", (3,), "bool"),
            TensorSpec("half", (1,), "float16"),
            TensorSpec("empty", (0,), "int32"),
        )
    )
    assert layout.untrained == ((2, 3), (3, 6))
    update = np.arange(1, 8, dtype=np.float32)
    np.testing.assert_array_equal(untrained_zeroed(update, layout), [1, 2, 0, 0, 0, 0, 7])
    assert update[2] == 3  # a copy: the caller's vector is its own
    plain = Layout((TensorSpec("w", (2,), "float32"),))
    unchanged = update[:2]
    assert untrained_zeroed(unchanged, plain) is unchanged and plain.untrained == ()


def test_a_batchnorm_model_trains_under_the_default_policy(tmp_path: Path) -> None:
    result = simulate(job(), client_app=client_fn, out=tmp_path / "run")
    assert result.summary["rounds_completed"] == 2, result.rows  # before: every update denied
    assert counters(result.parameters) == [0.0]


def test_dp_noise_and_a_server_momentum_leave_the_counter_alone(tmp_path: Path) -> None:
    sections = {
        "strategy": {"name": "fedavgm"},
        "privacy": {"placement": "central", "noise_multiplier": 0.5, "clip_norm": 5.0},
        "playbook": {"enabled": False},
    }
    result = simulate(job(**sections), client_app=client_fn, out=tmp_path / "run")
    assert result.summary["rounds_completed"] == 2, result.rows
    assert counters(result.parameters) == [0.0]  # before: noise and momentum moved it


def test_a_torch_clients_floating_buffers_are_marked_statistics() -> None:
    client = client_fn(ClientContext(client_id="c", partition_index=0, num_partitions=1))
    layout = client.get_parameters().layout
    marked = [spec.name for spec in layout.specs if spec.statistic]
    assert marked == ["1.running_mean", "1.running_var"]
    again = Layout.from_json(layout.to_json())
    assert again == layout and again.statistics == layout.statistics
    plain = Layout(tuple(TensorSpec(s.name, s.shape, s.dtype) for s in layout.specs))
    assert plain.difference(layout) is None  # which are statistics is the model's to say
    with pytest.raises(ModelError, match="malformed layout"):
        Layout.from_json('[["w",[2],"float32","momentum"]]')


def test_a_server_optimizer_steps_weights_and_averages_statistics() -> None:
    layout = Layout((TensorSpec("w", (2,)), TensorSpec("mean", (2,), statistic=True)))
    coordinator = Coordinator(
        settings=RoundSettings(clients_per_round=2, quorum=1.0, deadline_s=100.0),
        strategy=make_strategy("fedadam"),
        parameters=Parameters.zeros(layout),
        seed=3,
    )
    actions = coordinator.handle(StartRound(1, Phase.FIT, 0.0, ("a", "b")))
    cohort = sorted(action.client_id for action in actions if isinstance(action, SendFitTask))
    closing: list[object] = []
    for client, update in zip(cohort, ([1.0, 1.0, 4.0, 2.0], [3.0, 3.0, 6.0, 4.0]), strict=True):
        received = UpdateReceived(client, 1, 1.0, np.asarray(update, np.float32), 10, {})
        closing = coordinator.handle(received)
    assert any(isinstance(action, RoundClosed) for action in closing)
    vector = coordinator.parameters.vector
    np.testing.assert_allclose(vector[2:], [5.0, 3.0])  # the mean update, as it is
    assert abs(vector[0]) < 1.0  # Adam's step: its learning rate, not the update's 2


def test_a_batchnorm_model_trains_under_server_optimizers(tmp_path: Path) -> None:
    for name in ("fedavgm", "fedadam"):
        sections = {"strategy": {"name": name}, "run": {"rounds": 4}}
        sections["playbook"] = {"enabled": False}
        result = simulate(job(**sections), client_app=client_fn, out=tmp_path / name)
        assert result.summary["rounds_completed"] == 4, result.rows
        assert float(result.parameters.views()["1.running_var"].min()) > 0
        assert counters(result.parameters) == [0.0]
