"""``shoal demo network``: a coordinator and client processes training over TLS on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import shoal

SOURCE = str(Path(shoal.__file__).resolve().parents[1])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_demo_trains_a_round_over_tls(tmp_path: Path) -> None:
    port = str(free_port())
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "demo", "network", "--clients", "2", "--rounds", "1",
         "--port", port],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": SOURCE},
        timeout=240,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"coordinator listening on 127.0.0.1:{port}" in result.stdout
    rounds = [line.split() for line in result.stdout.splitlines() if " fit " in line]
    assert [(row[0], row[1], row[3]) for row in rounds] == [("1", "fit", "2")]  # both reported
    assert list(tmp_path.iterdir()) == []  # the demo keeps its files in a temporary folder
    assert "WARNING" not in result.stdout + result.stderr  # its token was "demo", warned about


def test_a_client_app_that_raises_is_one_config_error(tmp_path: Path) -> None:
    (tmp_path / "raising_app.py").write_text("def client_fn(context):\n    raise KeyError('x')\n")
    job = tmp_path / "job.toml"
    job.write_text('[app]\nclient = "raising_app:client_fn"\n')
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "client", "run", "--config", str(job),
         "--coordinator", "127.0.0.1:1", "--state-dir", str(tmp_path / "state"), "--insecure"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "the client app failed: KeyError: 'x'" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
