"""``shoal coordinator serve --dashboard``: the dashboard served by the coordinator's process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.dashboard import TOKEN_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RUN = "watched"


def job(base: Path) -> Path:
    config = base / "job.toml"
    config.write_text(
        f"""
[run]
name = "{RUN}"
[coordinator]
listen = "127.0.0.1:0"
run_id = "{RUN}"
state_dir = "{base / "state"}"
enrollment_tokens = ["test-token"]
"""
    )
    return config


def read_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/state", timeout=10) as response:
        state: dict[str, Any] = json.load(response)
        return state


def wait_for_url(log: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", text)
        if found and "coordinator listening" in text:
            return found.group(1)
        assert process.poll() is None, text
        time.sleep(0.2)
    raise AssertionError(f"no dashboard address in:\n{log.read_text(errors='replace')}")


def test_the_coordinator_serves_its_run_on_the_dashboard(tmp_path: Path) -> None:
    log = tmp_path / "coordinator.log"
    command = [
        sys.executable,
        "-m",
        "shoal",
        "coordinator",
        "serve",
        "--config",
        str(job(tmp_path)),
    ]
    command += ["--insecure", "--dashboard", "--dashboard-port", "0"]
    with log.open("ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=output)
    try:
        url = wait_for_url(log, process)
        state = read_state(url)
        assert "model versions of watched" in state["html"]  # the coordinator's registry
        assert re.search(r"<td>HEAD</td><td>0</td>", state["html"])  # its initial model
        assert not state["finished"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    with pytest.raises(urllib.error.URLError):  # the dashboard stopped with the coordinator
        read_state(url)


def test_a_public_dashboard_address_without_a_token_stops_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    arguments = ["coordinator", "serve", "--config", str(job(tmp_path)), "--insecure"]
    result = CliRunner().invoke(app, [*arguments, "--dashboard", "--dashboard-host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "config error: --dashboard-host 0.0.0.0:" in result.output
    assert "--dashboard-token" in result.output
    assert not (tmp_path / "state").exists()  # nothing was opened
