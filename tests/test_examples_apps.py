"""The app examples (examples/*/) run as their READMEs say: simulated, and the CNN deployed."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from support.documents import (
    ROOT,
    SHOAL,
    Deployment,
    deploy,
    fenced_blocks,
    free_port,
    run,
    shell_commands,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLES = ROOT / "examples"


def simulate(job: Path, out: Path, *overrides: str, cwd: Path) -> list[dict[str, Any]]:
    """Two rounds of ``shoal simulate JOB`` in one process; the rows of metrics.jsonl."""
    command = [*SHOAL, "simulate", str(job), "--rounds", "2", "--out", str(out), "--quiet"]
    command += ["--set", "simulation.workers=0"]
    for override in overrides:
        command += ["--set", override]
    result = run(command, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary_of(folder: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((folder / "summary.json").read_text())
    return summary


def fits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row["phase"] == "fit"]


def test_the_pytorch_cnn_learns_digits_in_simulation(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    rows = fits(simulate(EXAMPLES / "pytorch-cnn" / "job.toml", tmp_path / "run", cwd=tmp_path))
    assert [(row["round"], row["committed"], row["reported"]) for row in rows] == [
        (1, True, 10),
        (2, True, 10),
    ]
    assert rows[1]["test_loss"] < rows[0]["test_loss"]  # the app's central evaluation
    summary = summary_of(tmp_path / "run")
    assert summary["architecture"] == "digits-cnn-v1"
    assert summary["final_accuracy"] == rows[1]["test_accuracy"] > 0.5  # chance is 0.1
    assert summary["num_parameters"] == 16 * 9 + 16 + 32 * 16 * 9 + 32 + 512 * 10 + 10


def test_the_pytorch_cnn_trains_with_dp_sgd_through_opacus(tmp_path: Path) -> None:
    pytest.importorskip("opacus")
    rows = fits(simulate(EXAMPLES / "pytorch-cnn" / "job-dp.toml", tmp_path / "run", cwd=tmp_path))
    assert all(row["committed"] for row in rows)
    assert all(row["dp_sgd_noise_multiplier"] == 1.0 for row in rows)  # the clients' DP-SGD
    summary = summary_of(tmp_path / "run")
    epsilon = summary["record_level_epsilon"]
    assert 0 < epsilon < math.inf and summary["record_level_delta"] == 1e-3


def test_each_site_reads_its_own_csv_file(tmp_path: Path) -> None:
    example = EXAMPLES / "csv-per-client"
    made = run([sys.executable, str(example / "make_data.py"), "data"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    files = sorted((tmp_path / "data" / "clients").glob("*.csv"))
    assert [path.name for path in files] == [f"site-{i:02d}.csv" for i in range(1, 6)]
    rows = fits(simulate(example / "job.toml", tmp_path / "run", cwd=tmp_path))
    sizes = [len(path.read_text().splitlines()) - 1 for path in files]
    # every site trained on its own file, less the fifth it keeps for local evaluation
    assert rows[0]["num_examples"] == sum(size - round(0.2 * size) for size in sizes)
    assert rows[0]["reported"] == 5
    summary = summary_of(tmp_path / "run")
    assert summary["architecture"] == "digits-softmax-v1"
    assert summary["final_accuracy"] == rows[1]["test_accuracy"] > 0.5


def test_the_custom_server_app_schedules_evaluates_and_aggregates(tmp_path: Path) -> None:
    rows = fits(
        simulate(
            EXAMPLES / "custom-server" / "job.toml",
            tmp_path / "run",
            'app.options.decay="0.5"',
            cwd=tmp_path,
        )
    )
    # the learning rate each client was sent, reported back: 0.5, then halved
    assert [row["learning_rate"] for row in rows] == [pytest.approx(0.5), pytest.approx(0.25)]
    for row in rows:
        assert 0 < row["worst_local_f1"] <= row["local_f1"] <= 1  # the app's aggregation
        assert 0 < row["test_macro_f1"] <= 1 and row["accuracy"] == row["test_accuracy"]
    assert summary_of(tmp_path / "run")["architecture"] == "digits-mlp-32"


def deployment_commands(readme: Path) -> list[list[str]]:
    """The commands of the README's shell block that deploys."""
    block = next(b for b in fenced_blocks(readme.read_text(), "sh") if "coordinator serve" in b)
    return shell_commands(block)


def deployed(
    tmp_path: Path, name: str, files: tuple[str, ...], readme_port: int
) -> tuple[Path, Deployment]:
    """Example ``name``'s ``files``, unchanged, deployed as its README says (a CA, a
    coordinator and three clients over TLS), on a free port, for two rounds: the folder and
    the deployment's outcome."""
    example = tmp_path / name
    example.mkdir()
    for file in files:
        shutil.copy(EXAMPLES / name / file, example / file)
    port = free_port()
    commands = deployment_commands(EXAMPLES / name / "README.md")
    assert [command[len(SHOAL) : len(SHOAL) + 2] for command in commands] == [
        ["certs", "init"],
        ["coordinator", "serve"],
        *[["client", "run"]] * 3,
    ]
    certs, serve, *clients = [
        [arg.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{port}") for arg in command]
        for command in commands
    ]
    made = run(certs, cwd=example)
    assert made.returncode == 0, made.stderr
    serve += ["--set", f'coordinator.listen="127.0.0.1:{port}"', "--set", "run.rounds=2"]
    serve += ["--set", "coordinator.linger_s=5"]
    return example, deploy(serve, clients, cwd=example)


def test_the_pytorch_cnn_deploys_over_tls_as_its_readme_says(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    example, deployment = deployed(tmp_path, "pytorch-cnn", ("app.py", "deploy.toml"), 50061)
    output = deployment.output
    assert deployment.codes == [0, 0, 0, 0], output  # told the run is over, the clients leave
    state = example / "coordinator-state"
    rows = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert [(row["round"], row["phase"], row["committed"]) for row in rows] == [
        (1, "fit", True),
        (2, "fit", True),
    ], output
    assert all(0 < row["test_accuracy"] <= 1 for row in rows)  # the server app's evaluation
    summary = summary_of(state)
    assert summary["rounds_completed"] == 2 and summary["architecture"] == "digits-cnn-v1"
    assert json.loads((state / "config.json").read_text())["run"]["name"] == "pytorch-cnn"


def test_the_portable_features_deploy_over_tls_as_their_readme_says(tmp_path: Path) -> None:
    """Three phone processes and a coordinator over TLS: the coordinator records the module's
    sha256 with every version, and each phone (which has the job's module file, so pins it)
    computes with the module it fetched; then the registry gives the module back."""
    pytest.importorskip("wasmtime")
    files = ("app.py", "deploy.toml", "features.wat")
    example, deployment = deployed(tmp_path, "portable-features", files, 50062)
    output = deployment.output
    assert deployment.codes == [0, 0, 0, 0], output
    assert output.count("feature module phone-context 1.0.0") == 3, output  # each phone's line
    state = example / "coordinator-state"
    rows = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert [(row["round"], row["committed"]) for row in rows] == [(1, True), (2, True)], output
    assert all(0.5 < row["test_accuracy"] <= 1 for row in rows)  # the server's features too
    exported = run(
        [*SHOAL, "models", "features", "portable-features", "head", "--out", "served.wasm"],
        cwd=example,
    )
    assert exported.returncode == 0, exported.stderr
    assert (example / "served.wasm").read_bytes()[:4] == b"\0asm"
