"""The live dashboard over HTTP: the stdlib's threading server, read-only, loopback by default.

Routes: ``/`` (the page), ``/api/state?since=REVISION`` (204 when nothing
changed, else ``{"revision", "round", "finished", "html"}``),
``/dashboard.js`` and ``/dashboard.css``. Only GET and HEAD are served.

Access: the server binds 127.0.0.1 unless told otherwise, and refuses any
other address without a token (:func:`check_bind`). With a token every
request must carry it, as ``Authorization: Bearer TOKEN`` or in the HttpOnly
cookie that a first load with ``?token=TOKEN`` sets (the answer redirects to
the same address without it); tokens are compared in constant time.
Without a token only loopback Host names are answered, so that a web page
elsewhere cannot reach the server through DNS rebinding.

Every answer, refusals and errors included, carries :data:`SECURITY_HEADERS`
(no framing, no sniffing, no referrer, no cache, scripts from this origin
only). A connection that does not finish its request within
``request_timeout_s`` is closed, and past ``max_connections`` open at once a
new one is closed unanswered (:class:`~shoal.core.serving.BoundedThreadingMixIn`),
so a peer holding connections open (slowloris) holds neither unbounded
threads nor a thread for ever. An unexpected error
is a 500 with one line, logged here, never a traceback to the browser; the
token is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from shoal.core.errors import ConfigError, ShoalError, TransportError
from shoal.core.serving import (
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT_S,
    BoundedThreadingMixIn,
    host_name,
    is_loopback,
)
from shoal.dashboard import assets, page
from shoal.dashboard.state import RunReader, Snapshot
from shoal.telemetry.metrics import METRICS_FILE, SUMMARY_FILE
from shoal.telemetry.report import DRIFT_FILE, Figure, figures, load_run

log = logging.getLogger("shoal.dashboard")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
TOKEN_ENV = "SHOAL_DASHBOARD_TOKEN"
MIN_TOKEN_CHARS = 16
STOP_POLL_S = 0.1  # how often a serving thread looks for a stop request
_TOKEN_IN_QUERY = re.compile(r"(?<=[?&]token=)[^&\s]*")
COOKIE = "shoal_dashboard"
RUN_FILES = (METRICS_FILE, DRIFT_FILE, SUMMARY_FILE)  # what the figures are drawn from
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

FigureSource = Callable[[Path], Sequence[Figure]]


def check_bind(host: str, token: str | None, *, options: str = "") -> None:
    """Refuse a non-loopback address without a token, and a token too short to guess at.

    ``options`` prefixes the option names the errors cite (``dashboard-``
    for ``shoal coordinator serve --dashboard-host``).
    """
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"--{options}token: the dashboard's token must have at least "
            f"{MIN_TOKEN_CHARS} characters"
        )
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"--{options}host {host}: the dashboard serves a non-loopback address only with an "
            f"auth token (--{options}token or {TOKEN_ENV})"
        )


def report_figures(folder: Path) -> Sequence[Figure]:
    """The run report's figures of the run in ``folder``, as ``shoal report`` draws them."""
    return figures([load_run(folder)])


class Dashboard:
    """The page and its fragment for one run: a snapshot rendered, figures redrawn only when
    the run's files change."""

    def __init__(self, reader: RunReader, *, figures: FigureSource = report_figures) -> None:
        self.reader = reader
        self.figure_source = figures
        self._figures: tuple[object, Sequence[Figure]] | None = None
        self._lock = threading.Lock()

    def state(self) -> tuple[str, Snapshot, str]:
        """(revision, snapshot, fragment): the revision is the fragment's digest."""
        snapshot = self.reader.snapshot()
        fragment = page.fragment(snapshot, self._current_figures(snapshot))
        revision = hashlib.sha256(fragment.encode()).hexdigest()[:16]
        return revision, snapshot, fragment

    def page(self) -> str:
        revision, snapshot, fragment = self.state()
        return page.page(fragment, revision=revision, title=snapshot.run_name)

    def close(self) -> None:
        self.reader.close()

    def _current_figures(self, snapshot: Snapshot) -> Sequence[Figure]:
        if not snapshot.rows:
            return ()
        stamp = tuple(_stat(snapshot.folder / name) for name in RUN_FILES)
        with self._lock:
            if self._figures is None or self._figures[0] != stamp:
                self._figures = (stamp, self.figure_source(snapshot.folder))
            return self._figures[1]


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_mtime_ns, status.st_size


class DashboardServer(BoundedThreadingMixIn, HTTPServer):
    """Serves ``dashboard`` on ``host:port`` (port 0: any free one); :meth:`start` serves it
    from a thread, :meth:`serve_forever` from the caller's."""

    def __init__(
        self,
        dashboard: Dashboard,
        *,
        host: str = DEFAULT_HOST,
        port: int,
        token: str | None,
        options: str = "",
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        check_bind(host, token, options=options)
        self.dashboard = dashboard
        self.token = token
        self._thread: threading.Thread | None = None
        try:
            version = ipaddress.ip_address(host.strip("[]")).version
        except ValueError:
            version = 4
        self.address_family = socket.AF_INET6 if version == 6 else socket.AF_INET
        try:
            super().__init__(
                (host.strip("[]"), port),
                _Handler,
                request_timeout_s=request_timeout_s,
                max_connections=max_connections,
            )
        except OSError as exc:  # an environment problem (exit 1), as for coordinator.listen
            raise TransportError(
                f"--{options}port {port}: the dashboard cannot listen on {host}: "
                f"{exc.strerror or exc}"
            ) from exc

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(
            target=self.serve_forever, args=(STOP_POLL_S,), name="shoal-dashboard", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (if a thread serves) and release the socket and the registry."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
        self.dashboard.close()

    @property
    def cookie(self) -> str:
        """The cookie's value: derived from the token (hex, so it needs no quoting)."""
        secret = (self.token or "").encode()
        return hmac.new(secret, COOKIE.encode(), hashlib.sha256).hexdigest()

    def allows(self, candidate: str | None) -> bool:
        """Whether ``candidate`` is the token (always, when none is configured)."""
        if self.token is None:
            return True
        return candidate is not None and hmac.compare_digest(
            candidate.encode(), self.token.encode()
        )

    def allows_cookie(self, candidate: str | None) -> bool:
        """Whether ``candidate`` is the cookie a ``?token=`` load set."""
        if self.token is None:
            return True
        return candidate is not None and hmac.compare_digest(
            candidate.encode(), self.cookie.encode()
        )


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "shoal-dashboard"
    sys_version = ""

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def version_string(self) -> str:
        return self.server_version  # no Python version to tell a prober

    def log_message(self, format: str, *args: Any) -> None:
        line = _TOKEN_IN_QUERY.sub("REDACTED", format % args)
        log.debug("%s %s", self.address_string(), line)

    def end_headers(self) -> None:
        """The security headers on every answer, the server's own refusals included."""
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def _route(self, *, body: bool) -> None:
        target = urlsplit(self.path)
        query = parse_qs(target.query)
        if self.server.token is None and not is_loopback(
            host_name(self.headers.get("Host"), default=str(self.server.server_address[0]))
        ):
            self._send(HTTPStatus.FORBIDDEN, b"unexpected Host header\n", "text/plain", body=body)
            return
        if "token" in query and self.server.allows(query["token"][-1]):
            self._sign_in(target.path, query)
            return
        if not self._authorized():
            self._send(
                HTTPStatus.UNAUTHORIZED,
                b"the dashboard needs its token\n",
                "text/plain",
                body=body,
                headers={"WWW-Authenticate": 'Bearer realm="shoal-dashboard"'},
            )
            return
        try:
            self._serve(target.path, query, body=body)
        except ShoalError as exc:  # a registry that cannot be read: one line, and keep serving
            log.warning("dashboard: %s", exc)
            message = json.dumps({"error": str(exc)}).encode()
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, message, "application/json", body=body)
        except Exception:  # a bug: the operator's log has it, the browser one line
            log.exception("dashboard: %s failed", target.path)
            message = json.dumps({"error": "internal error: see the dashboard's log"}).encode()
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, message, "application/json", body=body)

    def _serve(self, path: str, query: dict[str, list[str]], *, body: bool) -> None:
        dashboard = self.server.dashboard
        if path == "/":
            self._send(HTTPStatus.OK, dashboard.page().encode(), "text/html", body=body)
        elif path == "/api/state":
            revision, snapshot, fragment = dashboard.state()
            if query.get("since", [None])[-1] == revision:
                self._send(HTTPStatus.NO_CONTENT, b"", "application/json", body=False)
                return
            state = {
                "revision": revision,
                "round": snapshot.current_round,
                "finished": snapshot.finished,
                "html": fragment,
            }
            self._send(HTTPStatus.OK, json.dumps(state).encode(), "application/json", body=body)
        elif path == "/dashboard.js":
            self._send(HTTPStatus.OK, assets.SCRIPT.encode(), "text/javascript", body=body)
        elif path == "/dashboard.css":
            self._send(HTTPStatus.OK, assets.STYLESHEET.encode(), "text/css", body=body)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", body=body)

    def _sign_in(self, path: str, query: dict[str, list[str]]) -> None:
        """Trade a ``?token=`` for the cookie, and send the browser back without it."""
        rest = {key: values for key, values in query.items() if key != "token"}
        # always a path of this server: "//host" would send the browser elsewhere
        location = "/" + path.lstrip("/") + (f"?{urlencode(rest, doseq=True)}" if rest else "")
        cookie = f"{COOKIE}={self.server.cookie}; HttpOnly; SameSite=Strict; Path=/"
        headers = {"Location": location, "Set-Cookie": cookie}
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", body=False, headers=headers)

    def _authorized(self) -> bool:
        """The token as a bearer header, else the cookie (either: nothing, without a token)."""
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return self.server.allows(credentials.strip())
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(COOKIE)
        except CookieError:
            morsel = None
        return self.server.allows_cookie(None if morsel is None else morsel.value)

    def _send(
        self,
        status: HTTPStatus,
        content: bytes,
        content_type: str,
        *,
        body: bool,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header(
            "Content-Length", str(len(content) if status != HTTPStatus.NO_CONTENT else 0)
        )
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body and content:
            self.wfile.write(content)


def open_dashboard(
    folder: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    registry_url: str | None = None,
    run_id: str | None = None,
    options: str = "",
) -> DashboardServer:
    """A server bound to ``host:port`` for the run in ``folder`` (not serving yet: call
    :meth:`~DashboardServer.start` or :meth:`~DashboardServer.serve_forever`); ``options``
    as :func:`check_bind` takes it."""
    check_bind(host, token, options=options)  # before anything is opened
    reader = RunReader(folder, registry_url=registry_url, run_id=run_id)
    return DashboardServer(Dashboard(reader), host=host, port=port, token=token, options=options)
