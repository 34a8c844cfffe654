"""``shoal models mark`` and ``export``, and a rollback with no terminal, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.core import Parameters
from shoal.registry import BlobStore, ModelRegistry, ModelStatus, open_database

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)


def tensors(version: int) -> dict[str, np.ndarray]:
    """A model whose tensors have several shapes and dtypes, different in every version."""
    rng = np.random.default_rng(version)
    return {
        "0.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "0.bias": rng.standard_normal(4).astype(np.float32),
        "1.running_mean": rng.standard_normal(4).astype(np.float32),
        "1.num_batches_tracked": np.array(7 + version, dtype=np.int64),
        "file": np.arange(3, dtype=np.float32),  # a name np.savez could not take
    }


@pytest.fixture
def models(tmp_path: Path) -> Iterator[ModelRegistry]:
    """Model ``net`` at versions 0-2, HEAD at 2, in the state folder ``tmp_path/state``."""
    database = open_database(None, folder=tmp_path / "state" / "registry")
    registry = ModelRegistry(database, BlobStore(tmp_path / "state" / "blobs"))
    for version in range(3):
        registry.commit(
            "net",
            Parameters.from_mapping(tensors(version)),
            round=version,
            architecture_version="net-v1",
            now=NOW,
        )
    try:
        yield registry
    finally:
        database.close()


def shoal(*args: str | Path) -> Result:
    runner = CliRunner(env={"COLUMNS": "200"})  # a wide terminal: no cell is cut short
    return runner.invoke(app, [str(arg) for arg in args])


def state_dir(tmp_path: Path) -> tuple[str, str]:
    return ("--state-dir", str(tmp_path / "state"))


def one_error_line(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- mark --------------------------------------------------------------------------------


def test_mark_records_the_verdict_and_its_reason(models: ModelRegistry, tmp_path: Path) -> None:
    folder = state_dir(tmp_path)
    marked = as_json(
        shoal("models", "mark", "net", "1", "bad", "--reason", "loss diverged", "--json",
              *folder)
    )  # fmt: skip
    assert (marked["status"], marked["status_reason"]) == ("BAD", "loss diverged")
    assert datetime.fromisoformat(marked["status_changed_at"]).tzinfo is not None
    record = models.get("net", 1)
    assert (record.status, record.status_reason) == (ModelStatus.BAD, "loss diverged")
    good = shoal("models", "mark", "net", "0", "GOOD", "--reason", "held-out 0.95", *folder)
    assert good.exit_code == 0, good.output
    assert "net version 0: GOOD (held-out 0.95)" in good.stdout
    rows = as_json(shoal("models", "list", "--json", *folder))
    assert [(row["status"], row["status_reason"]) for row in rows] == [
        ("GOOD", "held-out 0.95"),
        ("BAD", "loss diverged"),
        ("CANDIDATE", None),
    ]
    table = shoal("models", "list", *folder)
    bad_line = next(line for line in table.stdout.splitlines() if "BAD" in line)
    assert "loss diverged" in bad_line
    shown = shoal("models", "show", "net", "1", *folder)
    assert "status_reason" in shown.stdout and "loss diverged" in shown.stdout
    refused = shoal("models", "rollback", "net", "1", "--yes", *folder)
    assert "marked BAD" in one_error_line(refused)


def test_marking_head_bad_says_how_to_move_head(models: ModelRegistry, tmp_path: Path) -> None:
    result = shoal("models", "mark", "net", "2", "bad", "--reason", "poisoned",
                   *state_dir(tmp_path))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "version 2 is HEAD" in result.stdout and "shoal models rollback net" in result.stdout
    assert models.head("net").version == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (("net", "9", "bad", "--reason", "x"), 1, "no version 9"),
        (("nope", "0", "bad", "--reason", "x"), 1, "'nope'"),
        (("net", "0", "meh", "--reason", "x"), 2, "VERDICT"),
        (("net", "0", "bad"), 2, "--reason"),
        (("net", "0", "bad", "--reason", "  "), 2, "--reason"),
    ],
)
def test_mark_mistakes(
    models: ModelRegistry, tmp_path: Path, args: tuple[str, ...], code: int, named: str
) -> None:
    result = shoal("models", "mark", *args, *state_dir(tmp_path))
    assert result.exit_code == code, result.output
    assert named in result.stderr
    assert "Traceback" not in result.output
    assert [record.status for record in models.list("net")] == [ModelStatus.CANDIDATE] * 3


# --- export ------------------------------------------------------------------------------


def export(models: ModelRegistry, tmp_path: Path, version: str, form: str, out: Path) -> Any:
    return as_json(
        shoal("models", "export", "net", version, "--format", form, "--out", out,
              "--json", *state_dir(tmp_path))
    )  # fmt: skip


def test_safetensors_is_the_registry_file_itself(models: ModelRegistry, tmp_path: Path) -> None:
    out = tmp_path / "net.safetensors"
    written = export(models, tmp_path, "1", "safetensors", out)
    record = models.get("net", 1)
    assert (written["version"], written["sha256"], written["tensors"]) == (1, record.sha256, 5)
    loaded = Parameters.load(out, expected_sha256=record.sha256)
    assert np.array_equal(loaded.vector, models.load("net", 1).vector)
    assert out.read_bytes() == models.blobs.get(record.blob)


@pytest.mark.parametrize("head", ["head", "HEAD"])
def test_npz_holds_each_tensor_with_its_name_shape_and_dtype(
    models: ModelRegistry, tmp_path: Path, head: str
) -> None:
    out = tmp_path / "net.npz"
    assert export(models, tmp_path, head, "npz", out)["version"] == 2
    expected = tensors(2)
    with np.load(out, allow_pickle=False) as npz:
        assert list(npz.files) == list(expected)
        for name, array in expected.items():
            assert npz[name].dtype == array.dtype and npz[name].shape == array.shape
            assert np.array_equal(npz[name], array)
        rebuilt = Parameters.from_mapping({name: npz[name] for name in npz.files})
    assert rebuilt.sha256() == models.get("net", 2).sha256


def test_torch_state_dict_loads_into_a_module(models: ModelRegistry, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "net.pt"
    export(models, tmp_path, "0", "torch", out)
    state = torch.load(out, weights_only=True)
    assert type(state).__name__ == "OrderedDict"
    expected = tensors(0)
    assert list(state) == list(expected)
    for name, array in expected.items():
        assert state[name].dtype == torch.from_numpy(array).dtype
        assert np.array_equal(state[name].numpy(), array)

    class Statistics(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(4))
            self.register_buffer("num_batches_tracked", torch.tensor(0))

    class Net(torch.nn.Module):
        """Names and shapes that match the registry's layout."""

        def __init__(self) -> None:
            super().__init__()
            self.add_module("0", torch.nn.Linear(3, 4))
            self.add_module("1", Statistics())
            self.register_buffer("file", torch.zeros(3))

    net = Net()
    net.load_state_dict(state, strict=True)
    assert torch.equal(net.get_submodule("0").weight, torch.from_numpy(expected["0.weight"]))
    assert torch.equal(net.get_submodule("0").bias, torch.from_numpy(expected["0.bias"]))
    assert net.get_submodule("1").num_batches_tracked.dtype == torch.int64
    assert int(net.get_submodule("1").num_batches_tracked) == 7


def test_torch_without_the_extra_names_it(
    models: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    out = tmp_path / "net.pt"
    result = shoal("models", "export", "net", "0", "--format", "torch", "--out", out,
                   *state_dir(tmp_path))  # fmt: skip
    assert "pip install 'shoal[torch]'" in one_error_line(result)
    assert not out.exists() and not out.with_name("net.pt.partial").exists()


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (("nope", "head", "--format", "npz"), 1, "no model named 'nope'"),
        (("nope", "0", "--format", "npz"), 1, "'nope' has no version 0"),
        (("net", "9", "--format", "npz"), 1, "no version 9"),
        (("net", "latest", "--format", "npz"), 2, "neither a version number nor head"),
        (("net", "0", "--format", "onnx"), 2, "--format"),
        (("net", "0"), 2, "--format"),
    ],
)
def test_export_mistakes(
    models: ModelRegistry, tmp_path: Path, args: tuple[str, ...], code: int, named: str
) -> None:
    out = tmp_path / "out.bin"
    result = shoal("models", "export", *args, "--out", out, *state_dir(tmp_path))
    assert result.exit_code == code, result.output
    assert named in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_export_never_overwrites_unless_forced(models: ModelRegistry, tmp_path: Path) -> None:
    out = tmp_path / "net.npz"
    out.write_bytes(b"keep me")
    args = ("models", "export", "net", "0", "--format", "npz", "--out", out, *state_dir(tmp_path))
    assert "refusing to overwrite" in one_error_line(shoal(*args))
    assert out.read_bytes() == b"keep me"
    assert shoal(*args, "--force").exit_code == 0
    with np.load(out) as npz:
        assert np.array_equal(npz["0.weight"], tensors(0)["0.weight"])
    missing = tmp_path / "no" / "such" / "folder" / "net.npz"
    result = shoal("models", "export", "net", "0", "--format", "npz", "--out", missing,
                   *state_dir(tmp_path))  # fmt: skip
    assert "cannot write" in one_error_line(result)


def test_a_corrupt_blob_is_not_exported(models: ModelRegistry, tmp_path: Path) -> None:
    Path(models.blobs.path(models.get("net", 0).blob)).write_bytes(b"not the weights")
    out = tmp_path / "net.npz"
    result = shoal("models", "export", "net", "0", "--format", "npz", "--out", out,
                   *state_dir(tmp_path))  # fmt: skip
    assert "corrupt" in one_error_line(result)
    assert not out.exists()


# --- rollback without a terminal ---------------------------------------------------------


def test_rollback_with_yes_needs_no_input(models: ModelRegistry, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["models", "rollback", "net", "0", "--yes", *state_dir(tmp_path)], input=None
    )
    assert result.exit_code == 0, result.output
    assert models.head("net").version == 0  # type: ignore[union-attr]


def test_rollback_with_stdin_closed(models: ModelRegistry, tmp_path: Path) -> None:
    """A cron job or a CI step: file descriptor 0 is closed, so Python has no sys.stdin."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shoal", "models", "rollback", "net", *args,
             *state_dir(tmp_path)],
            capture_output=True,
            preexec_fn=lambda: os.close(0),
            env={**os.environ, "PYTHONPATH": "src"},
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip

    asked = run("0")
    assert asked.returncode == 2, asked.stderr
    assert "--yes" in asked.stderr and "Traceback" not in asked.stderr
    assert models.head("net").version == 2  # type: ignore[union-attr]
    moved = run("0", "--yes")
    assert moved.returncode == 0, moved.stderr
    assert "version 2 -> version 0" in moved.stdout
    assert models.head("net").version == 0  # type: ignore[union-attr]
