"""An http(s) tracking server that cannot be reached, or goes away: one line, in seconds.

The peers are real sockets on 127.0.0.1 (:mod:`support.tracking_server`): a
port that refuses, one that accepts and never answers, and a tracking server
that answers a run's calls until it is closed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.core import ConfigError, RunError
from shoal.telemetry import MlflowTracker
from shoal.telemetry.tracking import HTTP_REQUEST_LIMITS
from support.tracking_server import (
    TrackingServer,
    closed_port,
    silent_server,
    unset_http_settings,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def mlflow_http_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    unset_http_settings(monkeypatch)


def test_a_closed_port_fails_in_one_line_naming_the_uri_and_the_cause() -> None:
    with closed_port() as port, pytest.raises(RunError) as caught:
        MlflowTracker(run_name="closed", tracking_uri=f"http://127.0.0.1:{port}")
    message = str(caught.value)
    assert message.startswith(f"MLflow tracking server http://127.0.0.1:{port} is not reachable")
    assert "refused" in message.lower()
    assert "\n" not in message
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # nothing set for a failed check


def test_a_host_that_does_not_resolve_fails_in_one_line() -> None:
    uri = "https://tracking.invalid"  # .invalid never resolves (RFC 2606)
    with pytest.raises(RunError, match=r"^MLflow tracking server https://tracking\.invalid is not"):
        MlflowTracker(run_name="nowhere", tracking_uri=uri)


def test_the_proxy_the_environment_names_is_checked_in_the_server_s_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "NO_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with closed_port() as proxy_port, TrackingServer() as server:
        proxy = f"http://127.0.0.1:{proxy_port}"
        monkeypatch.setenv("http_proxy", proxy)
        monkeypatch.setenv("no_proxy", "")
        with pytest.raises(RunError) as caught:
            MlflowTracker(run_name="proxied", tracking_uri=server.uri)
        assert f"refused (127.0.0.1:{proxy_port} through the proxy {proxy})" in str(caught.value)
        # a host the proxy is bypassed for: requests goes straight there, and so does the check
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        MlflowTracker(run_name="direct", tracking_uri=server.uri).end()
    assert server.calls[-1] == "runs/update"


@pytest.mark.parametrize(
    ("uri", "message"),
    [("http://:5000", "names no host"), ("http://127.0.0.1:port", "has an invalid port")],
)
def test_a_malformed_server_uri_is_a_config_error(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MlflowTracker(run_name="malformed", tracking_uri=uri)


def test_a_tracker_bounds_mlflow_requests_where_the_user_set_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with TrackingServer() as server:
        tracker = MlflowTracker(run_name="bounded", tracking_uri=server.uri)
        tracker.log_round(1, loss=0.5)
        tracker.end()
    assert server.metrics == [("loss", 1, 0.5)]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # the user's setting stays
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"


def test_a_local_store_sets_nothing(tmp_path: Path) -> None:
    MlflowTracker(run_name="local", folder=tmp_path).end()
    assert not set(HTTP_REQUEST_LIMITS) & set(os.environ)


def test_a_server_that_never_answers_fails_within_the_request_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the connection opens: MLflow waits
    with silent_server() as port, pytest.raises(RunError) as caught:
        MlflowTracker(run_name="silent", tracking_uri=f"http://127.0.0.1:{port}")
    message = str(caught.value)
    assert message.startswith(f"MLflow could not find the experiment at http://127.0.0.1:{port}")
    assert "timed out" in message and "\n" not in message


def test_a_server_that_goes_away_fails_the_next_call_in_one_line() -> None:
    with TrackingServer() as server:
        tracker = MlflowTracker(run_name="gone", tracking_uri=server.uri)
        tracker.log_round(1, loss=0.5)
        server.go_away()
        with pytest.raises(RunError) as caught:
            tracker.log_round(2, loss=0.4)
    message = str(caught.value)
    assert message.startswith(f"MLflow could not log metrics at {server.uri}")
    assert "refused" in message.lower() and "\n" not in message
    assert server.metrics == [("loss", 1, 0.5)]


SHOAL = [sys.executable, "-c", "from shoal.cli import main; main()"]
SMALL = [
    "--set", "data.num_clients=4",
    "--set", "round.clients_per_round=2",
    "--set", "simulation.workers=0",
]  # fmt: skip


def test_shoal_simulate_with_an_unreachable_server_exits_1_in_one_line(tmp_path: Path) -> None:
    with closed_port() as port:
        uri = f"http://127.0.0.1:{port}"
        tracked = ["--set", "tracking.mlflow=true", "--set", f"tracking.tracking_uri={uri}"]
        result = subprocess.run(
            [*SHOAL, "simulate", "--out", str(tmp_path / "run"), *SMALL, *tracked],
            capture_output=True,
            text=True,
            timeout=50,
        )
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: MLflow tracking server {uri} is not reachable")
    assert "refused" in line.lower()
