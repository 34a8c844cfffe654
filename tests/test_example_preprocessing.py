"""examples/federated-preprocessing runs as its README says: both passes simulated, then both
deployed over TLS (a coordinator and three hospital processes each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shoal.preprocessing import Scaler, read_statistics
from support.documents import ROOT, SHOAL, deploy, fenced_blocks, free_port, run, shell_commands

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLE = ROOT / "examples" / "federated-preprocessing"
FILES = ("app.py", "statistics.toml", "train.toml")
README_PORT = "127.0.0.1:50063"


def blocks() -> list[list[list[str]]]:
    """The commands of each shell block of the README, in order."""
    return [
        shell_commands(block) for block in fenced_blocks((EXAMPLE / "README.md").read_text(), "sh")
    ]


def copied(tmp_path: Path) -> Path:
    folder = tmp_path / "federated-preprocessing"
    folder.mkdir()
    for name in FILES:
        shutil.copy(EXAMPLE / name, folder / name)
    return folder


def test_both_passes_simulate_as_the_readme_says(tmp_path: Path) -> None:
    folder = copied(tmp_path)
    simulated, *_ = blocks()
    assert [command[len(SHOAL)] for command in simulated] == ["simulate", "simulate"]
    for command in simulated:
        result = run(command, cwd=folder)
        assert result.returncode == 0, result.stdout + result.stderr
    statistics, _ = read_statistics(folder / "runs" / "statistics")
    assert statistics.clients == 3 and statistics.features == 30
    (trained,) = (folder / "runs").glob("hospital-model-*")
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["rounds_completed"] == 20 and summary["final_accuracy"] >= 0.95


def test_both_passes_deploy_over_tls_as_the_readme_says(tmp_path: Path) -> None:
    folder = copied(tmp_path)
    _, first, second = blocks()
    port = f"127.0.0.1:{free_port()}"
    first, second = (
        [[arg.replace(README_PORT, port) for arg in command] for command in block]
        for block in (first, second)
    )
    steps = [command[len(SHOAL) : len(SHOAL) + 2] for command in [*first, *second]]
    assert steps == [
        ["certs", "init"],
        *([["coordinator", "serve"], *[["client", "run"]] * 3] * 2),
    ]
    made = run(first[0], cwd=folder)
    assert made.returncode == 0, made.stderr
    at = ["--set", f'coordinator.listen="{port}"', "--set", "coordinator.linger_s=5"]

    counted = deploy(first[1] + at, first[2:], cwd=folder)
    assert counted.codes == [0, 0, 0, 0], counted.output  # told the run is over, all leave
    assert "statistics: runs/statistics/statistics.json: 30 features" in counted.output
    statistics, _ = read_statistics(folder / "runs" / "statistics")
    assert statistics.clients == 3 and statistics.examples is not None
    assert (statistics.std > 0).all() and np.isfinite(statistics.mean).all()

    trained = deploy(second[0] + [*at, "--set", "run.rounds=3"], second[1:], cwd=folder)
    assert trained.codes == [0, 0, 0, 0], trained.output
    state = folder / "runs" / "model"
    rows = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    fits = [row for row in rows if row["phase"] == "fit"]
    assert [row["committed"] for row in fits] == [True, True, True], trained.output
    assert fits[-1]["test_accuracy"] >= 0.9  # standardized on the coordinator too
    stored = json.loads((state / "config.json").read_text())
    assert stored["preprocessing"]["sha256"] == read_statistics(folder / "runs" / "statistics")[1]
    readme = (EXAMPLE / "README.md").read_text()
    command = "shoal models scaler hospital-model head --out scaler.json --state-dir runs/model"
    assert command in readme
    exported = run(shell_commands(command)[0], cwd=folder)
    assert exported.returncode == 0, exported.stderr
    scaler = Scaler.parse((folder / "scaler.json").read_text())
    expected = read_statistics(folder / "runs" / "statistics")[0].scaler()
    assert scaler.text() == expected.text()
