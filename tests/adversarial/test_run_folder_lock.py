"""A run folder is one process's while a run uses it: a second one is refused in one line.

Two ``shoal simulate --resume`` of one run folder at once, or a first run and a
resume, or two coordinators on one state folder: before the fix both exited 0
and the run was corrupt (rounds committed twice, HEAD's parent chain jumping
back, committed versions without their ``metrics.jsonl`` row, as the second
rewrote the log that the first kept appending to). Every process here is a
real one: the holder is a simulation in a child process, stopped at its first
round until the test lets it go on, or killed there with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shoal.config import load_config
from shoal.coordinator.server import build
from shoal.core.errors import RunError
from shoal.simulation import Simulation
from shoal.simulation.runner import MODEL_NAME, open_run_models
from shoal.transport.certs import init_certificates
from support.jobs import bare_config
from support.user_errors import EXIT_ENVIRONMENT, SOURCE, one_line_error, run_shoal

TINY = [
    "run.rounds=2",
    "data.num_clients=6",
    "round.clients_per_round=3",
    "evaluation.every=1",
    "evaluation.clients=3",
    "simulation.workers=0",
    "report.enabled=false",
]
IN_USE = "is in use by another shoal process"

# resumes the run in argv[1] up to argv[2] rounds; stops at its first round until a line comes
HOLDER = textwrap.dedent(
    """
    import sys
    from shoal.config import apply_overrides, config_to_dict, parse_config
    from shoal.simulation import Simulation
    from shoal.simulation.runner import load_run_config

    folder, rounds = sys.argv[1], sys.argv[2]
    data = config_to_dict(load_run_config(folder))
    config = parse_config(apply_overrides(data, [f"run.rounds={rounds}"]))
    rows = []

    def stop_at_the_first_round(row):
        rows.append(row)
        if len(rows) == 1:
            print("holding", flush=True)
            sys.stdin.readline()

    Simulation(config, folder, resume=True).run(on_round=stop_at_the_first_round)
    """
)


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A finished run of two rounds."""
    folder = tmp_path / "run"
    Simulation(bare_config(TINY), folder).run()
    return folder


@contextmanager
def holding(folder: Path, *, rounds: int) -> Iterator[subprocess.Popen[str]]:
    """A child process resuming the run in ``folder``, stopped in its first round (the
    folder held); killed on the way out if it still runs."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(rounds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SOURCE},
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == "holding\n", line + child.communicate(timeout=60)[1]
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=60)


def go_on(child: subprocess.Popen[str]) -> None:
    """Let the held child finish its run; it must end well."""
    _, stderr = child.communicate("\n", timeout=120)
    assert child.returncode == 0, stderr


def check_consistent(folder: Path, *, rounds: int) -> None:
    """One version per round up to ``rounds``, each after its parent's round, with its row."""
    models = open_run_models(folder)
    try:
        versions = models.list(MODEL_NAME)
        head = models.head(MODEL_NAME)
    finally:
        models.database.close()
    by_number = {record.version: record for record in versions}
    assert sorted(record.round for record in versions) == list(range(rounds + 1))
    assert head is not None and head.round == rounds
    for record in versions:
        if record.parent is not None:
            assert by_number[record.parent].round < record.round, record
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    fit = [row for row in rows if row["phase"] == "fit"]
    assert sorted(row["round"] for row in fit) == list(range(1, rounds + 1))  # each once
    assert {row["model_version"] for row in fit} == set(by_number) - {0}


SECOND: dict[str, Callable[[Path], list[str | Path]]] = {
    "resume": lambda folder: ["simulate", "-q", "--resume", folder],
    "first-run": lambda folder: [
        "simulate", "-q", "--out", folder, *(part for o in TINY for part in ("--set", o))
    ],
}  # fmt: skip


@pytest.mark.parametrize("second", sorted(SECOND))
def test_a_second_process_is_refused_while_a_run_holds_its_folder(
    run_folder: Path, second: str
) -> None:
    with holding(run_folder, rounds=4) as first:
        result = run_shoal(*SECOND[second](run_folder))
        one_line_error(
            result,
            code=EXIT_ENVIRONMENT,
            contains=(f"run folder {run_folder} {IN_USE} (pid {first.pid})",),
        )
        go_on(first)
    check_consistent(run_folder, rounds=4)


@pytest.mark.parametrize("ending", ["finished", "killed"])
def test_the_folder_is_let_go_when_its_run_ends_or_its_process_is_killed(
    run_folder: Path, ending: str
) -> None:
    with holding(run_folder, rounds=4) as first:
        if ending == "finished":
            go_on(first)
        else:
            first.send_signal(signal.SIGKILL)  # no finally runs: the OS lets the lock go
            first.wait(timeout=60)
            assert first.returncode == -signal.SIGKILL
    result = run_shoal("simulate", "-q", "--resume", run_folder, "--rounds", "5")
    assert result.returncode == 0, result.stderr
    check_consistent(run_folder, rounds=5)


def test_a_coordinator_state_dir_is_one_coordinator_s(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init_certificates(tmp_path / "certs")
    job = tmp_path / "job.toml"
    job.write_text(
        "[data]\nnum_clients = 4\n[round]\nclients_per_round = 2\n"
        f'[coordinator]\nstate_dir = "{state}"\ncertificates = "{tmp_path / "certs"}"\n'
    )
    parts = build(load_config(job))  # this process serves the job, in the test's place
    try:
        result = run_shoal(
            "coordinator", "serve", "--config", job, "--set", "coordinator.listen='127.0.0.1:0'",
            cwd=tmp_path, timeout=90,
        )  # fmt: skip
        one_line_error(
            result,
            code=EXIT_ENVIRONMENT,
            contains=(f"coordinator.state_dir {state} {IN_USE} (pid {os.getpid()})",),
        )
    finally:
        parts.close()
    build(load_config(job)).close()  # closed: the next coordinator opens the folder


def test_one_registry_runs_a_model_for_one_coordinator(
    tmp_path: Path, shared_registry: str
) -> None:
    """Two coordinators with their own state folders and one registry (``registry_url``) both
    committed the model's versions on one HEAD before; the second is refused now, and a
    coordinator of another run name is not."""
    init_certificates(tmp_path / "certs")

    def job(name: str, state: str) -> Path:
        path = tmp_path / f"{state}.toml"
        path.write_text(
            f'[run]\nname = "{name}"\n[data]\nnum_clients = 4\n[round]\nclients_per_round = 2\n'
            f'[coordinator]\nstate_dir = "{tmp_path / state}"\n'
            f'certificates = "{tmp_path / "certs"}"\nregistry_url = "{shared_registry}"\n'
            f'blob_url = "{tmp_path / "blobs"}"\n'
        )
        return path

    parts = build(load_config(job("digits", "first")))
    try:
        with pytest.raises(RunError, match=f"model 'digits' of the registry {IN_USE}"):
            build(load_config(job("digits", "second")))
        build(load_config(job("another", "third"))).close()
    finally:
        parts.close()
    build(load_config(job("digits", "second"))).close()  # the first let the model go
