"""examples/lora-transformer/: only the LoRA adapters and the head are federated, and they learn."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("torch")

import shoal
from shoal.client.api import FitConfig
from shoal.client.app import ClientContext
from shoal.config import load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lora-transformer"


@pytest.fixture(scope="module")
def app() -> ModuleType:
    """The example's app.py, under a name of its own (other examples' apps are ``app`` too)."""
    spec = importlib.util.spec_from_file_location("lora_transformer_app", EXAMPLE / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def client(app: ModuleType, index: int, *, seed: int = 0) -> Any:
    context = ClientContext(
        client_id=f"client-{index}",
        partition_index=index,
        num_partitions=10,
        seed=seed,
        config=load_config(EXAMPLE / "job.toml"),
    )
    return app.client_fn(context)


def test_three_rounds_learn_with_only_the_adapters_and_head_federated(
    app: ModuleType, tmp_path: Path
) -> None:
    result = shoal.simulate(
        EXAMPLE / "job.toml",
        client_app=app.client_app,
        server_app=app.server_app,
        out=tmp_path / "run",
        rounds=3,
        overrides=["simulation.workers=0"],
    )
    assert result.summary["rounds_completed"] == 3
    assert result.summary["final_accuracy"] > 0.8  # a balanced test set: chance is 0.5
    names = result.parameters.layout.names
    assert names and all(".lora_a." in n or ".lora_b." in n or n.startswith("head.") for n in names)
    assert {"head.weight", "head.bias"} <= set(names)
    model = app.make_model(0)
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(t.numel() for t in app.frozen_state(model).values())
    federated = result.parameters.vector.size
    assert federated == result.summary["num_parameters"] == total - backbone
    assert federated < 0.2 * total


def test_the_backbone_is_shared_and_frozen(app: ModuleType) -> None:
    first, second = client(app, 0), client(app, 7, seed=5)
    backbone = app.frozen_state(first.module)
    other = app.frozen_state(second.module)
    assert backbone.keys() == other.keys() and len(backbone) > 0
    assert all(name.startswith("backbone.") and "lora_" not in name for name in backbone)
    assert all((backbone[name] == other[name]).all() for name in backbone)
    before = {name: tensor.clone() for name, tensor in backbone.items()}
    start = first.get_parameters()
    result = first.fit(start, FitConfig(round=1, seed=3, epochs=1, learning_rate=0.003))
    after = app.frozen_state(first.module)
    assert all((before[name] == after[name]).all() for name in before)
    assert result.parameters.layout.names == start.layout.names
    assert (result.parameters.vector != start.vector).any()  # the adapters and head trained
