"""Who the dashboard answers: loopback by default, a token for anything else, and its routes."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.core import ConfigError, DeviceState
from shoal.dashboard import TOKEN_ENV, DashboardServer, check_bind, is_loopback, open_dashboard
from shoal.dashboard.server import Dashboard
from shoal.dashboard.state import RunReader
from shoal.registry import ClientRegistry, registry_location
from shoal.telemetry.report import Figure

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


def raw_exchange(server: DashboardServer, request: bytes, *, timeout_s: float = 10) -> bytes:
    """Send ``request`` as is and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s) as peer:
        peer.sendall(request)
        answer = b""
        while chunk := peer.recv(65536):
            answer += chunk
        return answer


def answer_headers(answer: bytes) -> dict[str, str]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in head)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
        b"DELETE /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    ],
)
def test_every_refusal_carries_the_security_headers(
    open_server: DashboardServer, request_bytes: bytes
) -> None:
    """Methods other than GET and HEAD, oversized or malformed requests: refused, and the
    refusal can be neither framed nor sniffed as another type."""
    answer = raw_exchange(open_server, request_bytes)
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 414, 431, 501, 505)
    headers = answer_headers(answer)
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert b"Traceback" not in answer and b"Python" not in answer


def test_a_connection_that_sends_nothing_is_closed(tmp_path: Path) -> None:
    """Slowloris: a peer that opens connections and never finishes a request holds no
    serving thread past the request timeout."""
    reader = RunReader(tmp_path)
    server = DashboardServer(
        Dashboard(reader), port=0, token=None, request_timeout_s=0.2, max_connections=4
    ).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as idle:
            idle.sendall(b"GET / HTTP/1.1\r\n")  # and never the rest
            assert idle.recv(1024) == b""  # the server hung up
    finally:
        server.close()


def test_connections_past_the_limit_are_closed_at_once(tmp_path: Path) -> None:
    """A peer holding every connection slot makes the next connection close, not queue a
    thread; the slots come back when it lets go."""
    server = DashboardServer(
        Dashboard(RunReader(tmp_path)), port=0, token=None, max_connections=2
    ).start()
    try:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in "ab"]
        for connection in held:
            connection.sendall(b"GET / HTTP/1.1\r\n")  # a request begun, never finished
        assert raw_exchange(server, b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n") == b""
        for connection in held:
            connection.close()
        answered = answer_after_release(server)
        assert answered.startswith(b"HTTP/1.0 200")
    finally:
        server.close()


def answer_after_release(server: DashboardServer) -> bytes:
    """A GET once a slot is free again (the server notices a closed peer on its next read)."""
    answer = b""
    for _ in range(100):
        answer = raw_exchange(server, b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        if answer:
            break
        threading.Event().wait(0.05)
    return answer


def test_the_token_is_never_logged(
    guarded: DashboardServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="shoal.dashboard"):
        assert get(guarded, f"/?token={TOKEN}&x=1")[0] == 303
        assert get(guarded, f"/?x=1&token={TOKEN}")[0] == 303
    assert "GET" in caplog.text and TOKEN not in caplog.text


def test_an_unexpected_error_is_one_line_and_the_server_keeps_serving(tmp_path: Path) -> None:
    def broken(folder: Path) -> list[Figure]:
        raise ZeroDivisionError("a figure that cannot be drawn")

    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "phase": "fit"}\n')
    server = DashboardServer(
        Dashboard(RunReader(tmp_path), figures=broken), port=0, token=None
    ).start()
    try:
        status, headers, body = get(server, "/api/state")
        assert status == 500 and b"Traceback" not in body and b"ZeroDivision" not in body
        assert headers["X-Frame-Options"] == "DENY"
        assert get(server, "/dashboard.js")[0] == 200
    finally:
        server.close()


def test_what_clients_named_reaches_the_browser_as_text(tmp_path: Path) -> None:
    """A client's device class (any 64 characters it likes) and the failure kinds, classes and
    pseudonyms in the run's rows come back escaped in the page and in the state's fragment,
    which the page's script puts in place with innerHTML."""
    hostile = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
    database = registry_location(tmp_path, None).open()
    try:
        ClientRegistry(database).enroll("client-1", DeviceState(device_class=hostile[:64]))
    finally:
        database.close()
    row = {"round": 1, "phase": "fit", "drops_by_reason": {hostile: 1}}
    row["fairness"] = {hostile: {"participation_share": 1.0, "population_share": 1.0}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    drift = {"round": 1, "points": [[0.0, 1.0]], "labels": [0], "clients": [hostile]}
    (tmp_path / "drift.jsonl").write_text(json.dumps(drift) + "\n")
    server = open_dashboard(tmp_path, port=0).start()
    try:
        page = get(server, "/")[2].decode()
        fragment = json.loads(get(server, "/api/state")[2])["html"]
    finally:
        server.close()
    for html in (page, fragment):
        assert "&lt;img src=x" in html and "&lt;script&gt;" in html
        assert "<img" not in html and html.count("<script") == (1 if html is page else 0)
