"""When the machine refuses (a port, a host, a folder, a certificate), ``shoal`` says so in one
line with exit code 1, before it has opened or written anything.

The binding cases run the real command in its own process against real
sockets on 127.0.0.1. One of them is worse than a traceback on the code
before: gRPC shares a port with another gRPC server (``SO_REUSEPORT``), so a
second coordinator started on a busy port served beside the first, and the
clients were split between two runs.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from shoal.transport.certs import init_certificates
from support.user_errors import EXIT_CONFIG, EXIT_ENVIRONMENT, invoke, one_line_error, run_shoal

BUSY = "Address already in use"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a default state folder would land here, never in the repo


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """A small TLS job whose state folder is ``tmp_path/state``."""
    init_certificates(tmp_path / "certs")
    path = tmp_path / "job.toml"
    path.write_text(
        f"[data]\nnum_clients = 4\n[round]\nclients_per_round = 2\n"
        f'[coordinator]\nstate_dir = "{tmp_path / "state"}"\n'
        f'certificates = "{tmp_path / "certs"}"\n'
    )
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port that a plain listening socket holds."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.fixture
def grpc_port() -> Iterator[int]:
    """A port that another gRPC server holds, with gRPC's default SO_REUSEPORT."""
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


def serve(job: Path, listen: str) -> subprocess.CompletedProcess[str]:
    command = ["coordinator", "serve", "--config", job, "--set", f"coordinator.listen='{listen}'"]
    return run_shoal(*command, cwd=job.parent, timeout=90)


def test_a_busy_port_is_one_line_before_anything_is_opened(job: Path, busy_port: int) -> None:
    line = one_line_error(serve(job, f"127.0.0.1:{busy_port}"), code=EXIT_ENVIRONMENT)
    assert f"coordinator.listen: cannot listen on 127.0.0.1:{busy_port}: {BUSY}" in line
    assert not (job.parent / "state").exists()  # refused before the run was opened


def test_a_second_server_cannot_share_a_grpc_port(job: Path, grpc_port: int) -> None:
    """Before, gRPC's SO_REUSEPORT let this coordinator serve beside the other server."""
    try:
        result = serve(job, f"127.0.0.1:{grpc_port}")
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second server started on port {grpc_port}, which another one holds")
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=(BUSY,))


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("no-such-host.invalid", "the host 'no-such-host.invalid' does not resolve"),
        ("192.0.2.1", "Cannot assign requested address"),  # TEST-NET-1: never this machine's
    ],
)
def test_an_address_this_machine_cannot_listen_on_is_one_line(
    job: Path, host: str, reason: str
) -> None:
    result = serve(job, f"{host}:50051")
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=(f"{host}:50051: {reason}",))


@pytest.fixture(scope="module")
def key_holder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tenseal")
    base = tmp_path_factory.mktemp("keyholder")
    silos = base / "silos.json"
    assert invoke("keyholder", "silo-keys", "--out", silos, "--simulated", "2").exit_code == 0
    folder = base / "holder"
    made = invoke("keyholder", "init", "--dir", folder, "-k", "2", "--silos-file", silos)
    assert made.exit_code == 0, made.output
    return folder


@pytest.mark.parametrize(
    ("listen", "code", "expected"),
    [
        ("busy", EXIT_ENVIRONMENT, BUSY),
        ("no-such-host.invalid:50061", EXIT_ENVIRONMENT, "does not resolve"),
        ("127.0.0.1:70000", EXIT_CONFIG, "--listen: expected HOST:PORT"),
        ("50061", EXIT_CONFIG, "--listen: expected HOST:PORT"),
    ],
)
def test_the_key_holder_cannot_listen_is_one_line(
    key_holder: Path, busy_port: int, listen: str, code: int, expected: str
) -> None:
    address = f"127.0.0.1:{busy_port}" if listen == "busy" else listen
    command = ["keyholder", "serve", "--dir", key_holder, "--listen", address, "--insecure"]
    try:
        result = run_shoal(*command, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the key holder served on {address}")
    one_line_error(result, code=code, contains=(expected,))


# --- folders ------------------------------------------------------------------------------


@pytest.fixture
def blocked(tmp_path: Path) -> Path:
    """A path no folder can be made at: a file is in the way."""
    (tmp_path / "a-file").write_text("in the way\n")
    return tmp_path / "a-file" / "folder"


def test_a_state_dir_that_cannot_be_written_is_one_line(job: Path, blocked: Path) -> None:
    result = invoke(
        "coordinator", "serve", "--config", job, "--set", f"coordinator.state_dir='{blocked}'",
        "--set", "coordinator.listen='127.0.0.1:0'",
    )  # fmt: skip
    one_line_error(
        result,
        code=EXIT_ENVIRONMENT,
        contains=(f"error: coordinator.state_dir {blocked} cannot be written: Not a directory",),
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_a_read_only_run_folder_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    result = invoke("simulate", "--out", folder, "--rounds", "1")
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=("Permission denied",))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["simulate", "--out", "{blocked}", "--rounds", "1", "--set", "data.num_clients=4",
          "--set", "round.clients_per_round=2", "--set", "simulation.workers=0"],
         "run folder {blocked} cannot be written"),
        (["client", "run", "--coordinator", "127.0.0.1:1", "--state-dir", "{blocked}",
          "--insecure", "--partition-index", "0"],
         "client state folder {blocked} cannot be written"),
        (["clients", "enroll", "--state-dir", "{blocked}"],
         "registry folder {blocked}/registry cannot be written"),
        (["certs", "init", "--out", "{blocked}"], "certificate folder {blocked} cannot be written"),
        (["keyholder", "silo-keys", "--out", "{blocked}/keys.json", "--silo", "a"],
         "error: Not a directory: {blocked}"),  # an OSError that reached the command
    ],
)  # fmt: skip
def test_a_folder_that_cannot_be_made_is_one_line(
    blocked: Path, args: list[str], expected: str
) -> None:
    result = invoke(*(arg.format(blocked=blocked) for arg in args))
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=(expected.format(blocked=blocked),))


# --- certificates ---------------------------------------------------------------------------


def _break(certs: Path, name: str, how: str) -> None:
    if how == "missing":
        (certs / name).unlink()
    else:
        (certs / name).write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")


CERTIFICATE_FAULTS = {
    "missing": ("cannot read certificate", "No such file or directory"),
    "not PEM": ("is not a PEM certificate",),
}


@pytest.mark.parametrize("how", CERTIFICATE_FAULTS)
def test_the_coordinator_certificate_missing_or_not_pem_is_one_line(job: Path, how: str) -> None:
    _break(job.parent / "certs", "server.pem", how)
    result = invoke("coordinator", "serve", "--config", job)
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=CERTIFICATE_FAULTS[how])
    assert not (job.parent / "state").exists()


@pytest.mark.parametrize("how", CERTIFICATE_FAULTS)
def test_the_mutual_tls_ca_missing_or_not_pem_is_one_line(job: Path, how: str) -> None:
    _break(job.parent / "certs", "ca.pem", how)
    result = invoke("coordinator", "serve", "--config", job, "--set", "coordinator.mutual_tls=true")
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=CERTIFICATE_FAULTS[how])


@pytest.mark.parametrize("how", CERTIFICATE_FAULTS)
def test_the_key_holder_certificate_missing_or_not_pem_is_one_line(
    key_holder: Path, tmp_path: Path, how: str
) -> None:
    init_certificates(tmp_path / "certs")
    _break(tmp_path / "certs", "server.pem", how)
    command = ["keyholder", "serve", "--dir", key_holder, "--certificates", tmp_path / "certs"]
    result = invoke(*command, "--listen", "127.0.0.1:0")
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=CERTIFICATE_FAULTS[how])


@pytest.mark.parametrize("how", CERTIFICATE_FAULTS)
def test_the_pinned_ca_of_a_client_missing_or_not_pem_is_one_line(tmp_path: Path, how: str) -> None:
    init_certificates(tmp_path / "certs")
    _break(tmp_path / "certs", "ca.pem", how)
    result = invoke(
        "client", "run", "--coordinator", "127.0.0.1:1", "--state-dir", tmp_path / "client",
        "--ca", tmp_path / "certs" / "ca.pem", "--partition-index", "0",
    )  # fmt: skip
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=CERTIFICATE_FAULTS[how])


def test_a_busy_dashboard_port_is_an_environment_error(tmp_path: Path, busy_port: int) -> None:
    """As for coordinator.listen: the option may be right, the machine refuses (it said
    exit 2, a config mistake, before)."""
    result = invoke("dashboard", "--state-dir", tmp_path, "--port", str(busy_port))
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=(f"--port {busy_port}", BUSY))


def test_a_busy_metrics_port_is_an_environment_error(job: Path, busy_port: int) -> None:
    command = [
        "coordinator",
        "serve",
        "--config",
        job,
        "--set",
        f"coordinator.metrics_port={busy_port}",
    ]
    result = run_shoal(*command, cwd=job.parent, timeout=90)
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=(f"127.0.0.1:{busy_port}", BUSY))
