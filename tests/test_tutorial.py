"""docs/bring-your-own-model.md does what it says: its files, then its commands, in order.

Each python and toml block of the tutorial starts with a comment naming its file; the blocks
of one file, in order, are that file. The test writes them into a folder (two rounds instead
of ten, a free port) and runs the shell blocks from there: the simulation, the script, and
the deployment with a coordinator and three sites over TLS.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shoal.config import load_config
from support.documents import (
    ROOT,
    SHOAL,
    deploy,
    fenced_blocks,
    free_port,
    run,
    shell_commands,
)

TUTORIAL = ROOT / "docs" / "bring-your-own-model.md"
PORT = "127.0.0.1:50071"


def tutorial_files() -> dict[str, str]:
    """Each file the tutorial writes, from its blocks in order."""
    text = TUTORIAL.read_text()
    files: dict[str, str] = {}
    for block in [*fenced_blocks(text, "python"), *fenced_blocks(text, "toml")]:
        header = re.fullmatch(r"# ([\w.-]+\.(?:py|toml))", block.split("\n", 1)[0])
        assert header is not None, f"a block does not name its file: {block[:60]!r}"
        files[header[1]] = files.get(header[1], "") + block + "\n"
    return files


def write_tutorial(folder: Path, *, port: int) -> None:
    for name, text in tutorial_files().items():
        if name == "job.toml":
            assert "rounds = 10" in text and PORT in text
            text = text.replace("rounds = 10", "rounds = 2").replace(PORT, f"127.0.0.1:{port}")
        (folder / name).write_text(text)


def test_the_tutorial_writes_an_app_a_job_and_a_script(tmp_path: Path) -> None:
    files = tutorial_files()
    assert sorted(files) == ["job.toml", "my_app.py", "simulate.py"]
    for name in ("my_app.py", "simulate.py"):
        compile(files[name], name, "exec")
    write_tutorial(tmp_path, port=50071)
    config = load_config(tmp_path / "job.toml")
    assert (config.app.client, config.app.server) == ("my_app:client_app", "my_app:server_app")
    deployment = shell_commands(fenced_blocks(TUTORIAL.read_text(), "sh")[-1])
    sites = [command for command in deployment if "--num-partitions" in command]
    assert len(sites) == config.data.num_clients  # one site per simulated client
    for index, command in enumerate(sites):
        assert command[command.index("--partition-index") + 1] == str(index)
        assert command[command.index("--num-partitions") + 1] == str(len(sites))
        listed = [entry.token for entry in config.coordinator.enrollment_tokens]
        assert command[command.index("--token") + 1] in listed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_tutorial_runs_from_simulation_to_deployment(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    port = free_port()
    write_tutorial(tmp_path, port=port)
    assert load_config(tmp_path / "job.toml").app.client == "my_app:client_app"
    blocks = [shell_commands(block) for block in fenced_blocks(TUTORIAL.read_text(), "sh")]
    simulation, script, deployment = blocks

    assert len(simulation) == 1
    done = run(simulation[0], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "runs" / "first" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["architecture"] == "digits-mlp-v1"

    done = run(script[0], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"test accuracy \d+\.\d% after 2 rounds", done.stdout), done.stdout
    assert (tmp_path / "my-model.pt").is_file()

    certs, serve, *sites = [
        [arg.replace(PORT, f"127.0.0.1:{port}") for arg in command] for command in deployment
    ]
    assert serve[len(SHOAL) :][:2] == ["coordinator", "serve"] and len(sites) == 3
    made = run(certs, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    ended = deploy([*serve, "--set", "coordinator.linger_s=3"], sites, cwd=tmp_path)
    assert ended.codes == [0, 0, 0, 0], ended.output
    state = tmp_path / "coordinator-state"
    rows = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert [(row["round"], row["committed"]) for row in rows] == [(1, True), (2, True)]
    assert json.loads((state / "summary.json").read_text())["architecture"] == "digits-mlp-v1"
