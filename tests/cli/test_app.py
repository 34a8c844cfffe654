"""The ``shoal`` command as a whole: logging options everywhere, and help text without markup."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.registry import open_database
from shoal.transport.certs import TLS13_ONLY_CIPHER_SUITES

SOURCE = str(Path(__file__).resolve().parents[2] / "src")

# the secure round aborts (too few clients left after sharing keys), which the coordinator
# logs at WARNING with its reason
ABORTING = [
    "--rounds", "1",
    "--set", "data.num_clients=12",
    "--set", "round.clients_per_round=6",
    "--set", "evaluation.every=0",
    "--set", "simulation.workers=0",
    "--set", "secure_aggregation.protocol='secagg+'",
    "--set", "secure_aggregation.stage_dropout=0.9",
]  # fmt: skip
ABORT_LINE = "WARNING shoal.secure: secure round 1 aborted"

MARKUP = re.compile(
    r"\[/?(bold|dim|italic|underline|strike|reverse|blink|link|red|green|yellow|blue|cyan"
    r"|magenta|white|black|b|i|u|s)\b[^\]]*\]|\[/\]"
)


def shoal(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "120"}).invoke(app, [str(arg) for arg in args])


def command_paths() -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every group and command of ``shoal``, as the words that name it, the root first."""

    def walk(path: tuple[str, ...], command: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
        yield path, command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk((*path, name), sub)

    yield from walk((), typer.main.get_command(app))


ALL_COMMANDS = [path for path, _ in command_paths()]


@pytest.fixture
def empty_registry(tmp_path: Path) -> Path:
    open_database(None, folder=tmp_path / "registry").close()
    return tmp_path


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


def test_the_command_tree_is_all_there() -> None:
    assert ("models", "export") in ALL_COMMANDS and ("models", "mark") in ALL_COMMANDS
    assert ("simulate",) in ALL_COMMANDS and ("demo", "network") in ALL_COMMANDS
    assert len(ALL_COMMANDS) > 20


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda path: " ".join(path) or "shoal")
def test_every_help_lists_the_logging_options_and_shows_no_markup(path: tuple[str, ...]) -> None:
    result = shoal(*path, "--help")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "--verbose" in text and "-v" in text and "--log-level" in text
    assert MARKUP.search(text) is None, MARKUP.search(text)
    assert "``" not in text  # reStructuredText literals are for docstrings, not help


@pytest.mark.parametrize(
    ("args", "level"),
    [
        ((), logging.WARNING),
        (("-v",), logging.INFO),
        (("-vv",), logging.DEBUG),
        (("--log-level", "error"), logging.ERROR),
        (("--log-level", "DEBUG"), logging.DEBUG),
        (("-v", "--log-level", "critical"), logging.CRITICAL),  # an explicit level wins
    ],
)
@pytest.mark.parametrize("where", ["root", "group", "command"])
def test_logging_options_work_at_every_level(
    empty_registry: Path, args: tuple[str, ...], level: int, where: str
) -> None:
    words = {
        "root": [*args, "models", "list"],
        "group": ["models", *args, "list"],
        "command": ["models", "list", *args],
    }[where]
    result = shoal(*words, "--state-dir", empty_registry)
    assert result.exit_code == 0, result.output
    assert logging.getLogger().getEffectiveLevel() == level


def test_verbose_counts_across_levels(empty_registry: Path) -> None:
    assert shoal("-v", "models", "list", "-v", "--state-dir", empty_registry).exit_code == 0
    assert logging.getLogger().getEffectiveLevel() == logging.DEBUG


def test_warnings_of_coordinator_and_client_show_by_default(empty_registry: Path) -> None:
    assert shoal("models", "list", "--state-dir", empty_registry).exit_code == 0
    for name in ("shoal.coordinator", "shoal.client", "shoal.secure"):
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)


def test_a_bad_log_level_is_a_usage_error(empty_registry: Path) -> None:
    result = shoal("models", "list", "--log-level", "loud", "--state-dir", empty_registry)
    assert result.exit_code == 2
    assert "--log-level" in result.stderr and "Traceback" not in result.output


def test_a_failure_reason_is_on_stderr_unless_quiet(tmp_path: Path) -> None:
    default = shoal("simulate", "--out", tmp_path / "a", *ABORTING)
    assert default.exit_code == 1, default.output  # nothing trained
    assert ABORT_LINE in default.stderr and ABORT_LINE not in default.stdout
    quiet = shoal("simulate", "-q", "--out", tmp_path / "b", *ABORTING)
    assert quiet.exit_code == 1, quiet.output
    assert ABORT_LINE not in quiet.output
    assert quiet.stderr.startswith("error: no fit round committed")  # an error, even quiet
    asked = shoal("simulate", "-q", "--log-level", "warning", "--out", tmp_path / "c", *ABORTING)
    assert ABORT_LINE in asked.stderr  # an explicit level wins over --quiet


@pytest.mark.slow
def test_mlflow_log_lines_follow_the_level_and_quiet(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    tracked = [*ABORTING, "--set", "tracking.mlflow=true"]
    verbose = shoal("simulate", "-v", "--out", tmp_path / "v", *tracked)
    assert verbose.exit_code == 1, verbose.output  # its round aborts: nothing trained
    assert "INFO mlflow." in verbose.stderr  # MLflow does talk: creating its tables
    quiet = shoal("simulate", "-q", "--out", tmp_path / "q", *tracked)
    assert quiet.exit_code == 1, quiet.output
    (said,) = quiet.stderr.strip().splitlines()  # the error alone, no MLflow nor alembic
    assert said.startswith("error: no fit round committed")


@pytest.mark.parametrize(("given", "kept"), [(None, TLS13_ONLY_CIPHER_SUITES), ("AES", "AES")])
def test_the_shoal_command_leaves_tls12_nothing_unless_told(given: str | None, kept: str) -> None:
    """What the README promises: the shoal command speaks TLS 1.3 only, unless told otherwise."""
    environment = {k: v for k, v in os.environ.items() if k != "GRPC_SSL_CIPHER_SUITES"}
    if given is not None:
        environment["GRPC_SSL_CIPHER_SUITES"] = given
    environment["PYTHONPATH"] = SOURCE
    probe = (
        "import os, sys; import shoal.cli; "
        "print(os.environ['GRPC_SSL_CIPHER_SUITES'], 'grpc' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == [kept, "True"]  # set, and grpc imported after it


HANDSHAKE_PROBE = """
import socket, sys, tempfile, time
from concurrent import futures
import shoal.cli
import grpc
from shoal.transport.certs import init_certificates, load_server_credentials

certs = init_certificates(tempfile.mkdtemp())
server = grpc.server(futures.ThreadPoolExecutor(2))
port = server.add_secure_port("127.0.0.1:0", load_server_credentials(certs.server))
server.start()
for _ in range(20):  # a plaintext peer: each connection a failed TLS handshake
    with socket.create_connection(("127.0.0.1", port)) as peer:
        peer.sendall(b"GET / HTTP/1.1\\r\\n\\r\\n")
time.sleep(0.5)
server.stop(None)
"""


@pytest.mark.parametrize(("given", "lines"), [(None, 0), ("INFO", 20)])
def test_failed_handshakes_do_not_flood_the_shoal_commands_log(
    given: str | None, lines: int
) -> None:
    """Each failed TLS handshake was one INFO line of gRPC's core on stderr, with no limit:
    any peer that reached the port could flood the log. An operator's own setting wins."""
    environment = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    if given is not None:
        environment["GRPC_VERBOSITY"] = given
    environment["PYTHONPATH"] = SOURCE
    result = subprocess.run(
        [sys.executable, "-c", HANDSHAKE_PROBE],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=True,
    )
    failed = [line for line in result.stderr.splitlines() if "Handshake failed" in line]
    assert len(failed) >= lines if lines else failed == []
