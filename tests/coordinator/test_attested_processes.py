"""The attestation flow with real processes, as an operator runs it: release, allow, serve, train.

``shoal attest keygen`` and ``manifest`` make a release of a user's app,
``shoal attest allow`` puts it on the allow-list, ``shoal coordinator
serve`` requires it, and ``shoal client run --manifest`` processes train to
the end; a client whose copy of the app was edited exits at once with the
reason, and uses up no enrollment.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.registry import EnrollmentTokens, open_database
from shoal.transport.certs import init_certificates
from support.attestation import APP_SOURCE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SHOAL = [sys.executable, "-m", "shoal"]
CLIENTS = 2
APP_MODULE = "attested_user_app"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def shoal(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [*SHOAL, *(str(arg) for arg in args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def job_text(base: Path, port: int) -> str:
    return f"""
[run]
rounds = 1
[data]
num_clients = {CLIENTS}
[round]
clients_per_round = {CLIENTS}
over_selection = 1.0
quorum = 1.0
deadline_s = 60
[evaluation]
every = 0
[app]
client = "{APP_MODULE}:client_fn"
[coordinator]
listen = "127.0.0.1:{port}"
state_dir = "{base / "state"}"
certificates = "{base / "certs"}"
enrollment_tokens = [{{ token = "t", max_uses = {CLIENTS} }}]
retry_after_s = 0.3
grace_s = 1
linger_s = 5
attestation = "manifest"
release_keys = ["{base / "release.pub"}"]
"""


def client_command(base: Path, port: int, index: int, folder: Path) -> list[str]:
    return [
        *SHOAL, "client", "run", "--coordinator", f"127.0.0.1:{port}",
        "--config", str(folder / "job.toml"), "--state-dir", str(folder / f"client-{index}"),
        "--token", "t", "--ca", str(base / "certs" / "ca.pem"),
        "--partition-index", str(index), "--num-partitions", str(CLIENTS),
        "--manifest", str(base / "client.manifest.json"),
    ]  # fmt: skip


def test_released_clients_train_and_an_edited_one_exits_with_the_reason(tmp_path: Path) -> None:
    base = tmp_path
    init_certificates(base / "certs")
    port = free_port()
    job = base / "job"
    job.mkdir()
    (job / "job.toml").write_text(job_text(base, port))
    (job / f"{APP_MODULE}.py").write_text(APP_SOURCE)
    # the edited install: the same job, a copy of the app with one line added
    edited = base / "edited"
    edited.mkdir()
    (edited / "job.toml").write_text(job_text(base, port))
    (edited / f"{APP_MODULE}.py").write_text(APP_SOURCE + "\nSEND_DATA_TO = 'elsewhere'\n")

    assert shoal("attest", "keygen", "--out", base / "release").returncode == 0
    made = shoal(
        "attest", "manifest", "--release-key", base / "release.key", "--config", job / "job.toml",
        "--label", "v1", "--out", base / "client.manifest.json", "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    allowed = shoal(
        "attest", "allow", base / "client.manifest.json", "--reason", "release v1",
        "--state-dir", base / "state", "--json",
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["build_id"] == json.loads(made.stdout)["manifest_id"]

    log = (base / "coordinator.log").open("wb")
    coordinator = subprocess.Popen(
        [*SHOAL, "coordinator", "serve", "--config", str(job / "job.toml")], stdout=log, stderr=log
    )
    processes: list[subprocess.Popen[str]] = []
    try:
        # the edited client first: had its refusal used up a token, a good client would be refused
        refused = subprocess.run(
            client_command(base, port, 0, edited), capture_output=True, text=True, timeout=120
        )
        processes = [
            subprocess.Popen(
                client_command(base, port, index, job),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for index in range(CLIENTS)
        ]
        outputs = [process.communicate(timeout=180)[0] for process in processes]
        assert coordinator.wait(timeout=60) == 0, (base / "coordinator.log").read_text()
    finally:
        for process in [coordinator, *processes]:
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()

    assert refused.returncode == 1
    assert "warning:" in refused.stdout and "does not match" in refused.stdout
    assert "enrollment refused (unattested): modified: the app's code" in refused.stderr
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        assert "round 1 fit" in output and "the run has finished" in output
    with open_database(None, folder=base / "state" / "registry") as database:
        (token,) = EnrollmentTokens(database).list()
        assert token.uses_left == 0  # the two released clients, not the edited one
    summary = json.loads((base / "state" / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
