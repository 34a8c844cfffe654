"""Who the dashboard answers: loopback by default, a token for anything else, and its routes."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.core import ConfigError
from shoal.dashboard import TOKEN_ENV, DashboardServer, check_bind, is_loopback, open_dashboard

TOKEN = "s3cret-token-0123456789"


def get(
    server: DashboardServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[DashboardServer]:
    server = open_dashboard(tmp_path, port=0, token=TOKEN).start()
    yield server
    server.close()


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[DashboardServer]:
    server = open_dashboard(tmp_path, port=0).start()
    yield server
    server.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"])
def test_loopback_names(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "dashboard.example.com", ""])
def test_any_other_address_needs_a_token(host: str) -> None:
    with pytest.raises(ConfigError, match=f"only with an auth token .--token or {TOKEN_ENV}"):
        check_bind(host, None)
    check_bind(host, TOKEN)


def test_a_short_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16 characters"):
        check_bind("0.0.0.0", "short")


def test_the_command_refuses_a_public_address_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    result = CliRunner().invoke(
        app, ["dashboard", "--state-dir", str(tmp_path), "--host", "0.0.0.0", "--port", "0"]
    )
    assert result.exit_code == 2
    assert "config error: --host 0.0.0.0:" in result.output
    assert len(result.output.strip().splitlines()) == 1
    missing = CliRunner().invoke(app, ["dashboard", "--state-dir", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no such folder" in missing.output


def test_with_a_token_a_request_without_it_is_refused(guarded: DashboardServer) -> None:
    for path in ("/", "/api/state", "/dashboard.js"):
        status, headers, _ = get(guarded, path)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert get(guarded, "/", {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    assert get(guarded, "/?token=wrong-token-0123456789")[0] == 401
    assert get(guarded, "/", {"Cookie": "shoal_dashboard=" + TOKEN})[0] == 401  # not the cookie


def test_a_bearer_header_or_the_cookie_of_a_first_load_opens_it(guarded: DashboardServer) -> None:
    status, _, body = get(guarded, "/", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b'<main id="dashboard"' in body
    status, headers, _ = get(guarded, f"/?token={TOKEN}")
    assert status == 303 and headers["Location"] == "/"  # the token leaves the address bar
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    value = cookie.split(";")[0]
    assert get(guarded, "/api/state", {"Cookie": value})[0] == 200
    # a crafted path never redirects elsewhere
    assert get(guarded, f"//evil.example/?token={TOKEN}")[1]["Location"] == "/evil.example/"


def test_without_a_token_only_loopback_host_names_are_answered(
    open_server: DashboardServer,
) -> None:
    assert get(open_server, "/", {"Host": f"localhost:{open_server.port}"})[0] == 200
    assert get(open_server, "/", {"Host": "rebound.example.com"})[0] == 403


def test_the_state_is_sent_only_when_it_changed(open_server: DashboardServer) -> None:
    status, headers, body = get(open_server, "/api/state")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    state = json.loads(body)
    assert state["round"] is None and not state["finished"]
    assert get(open_server, f"/api/state?since={state['revision']}")[0] == 204
    assert get(open_server, "/api/state?since=older")[0] == 200
    assert get(open_server, "/nothing-here")[0] == 404
    script = get(open_server, "/dashboard.js")
    assert script[0] == 200 and b"/api/state?since=" in script[2]
