"""Network peers of an MLflow tracker, real sockets on 127.0.0.1, and its HTTP settings.

:func:`closed_port` is a port that refuses connections, :func:`silent_server`
one that accepts them and never answers, and :class:`TrackingServer` (served
by a thread) a tracking server that answers the few REST calls a tracker
makes for a run and its rounds, until :meth:`TrackingServer.go_away` closes
it. The real ``mlflow server`` needs Flask, which the ``mlflow`` extra
(mlflow-skinny) leaves out. :func:`unset_http_settings` keeps a test's
trackers from leaving MLflow's HTTP settings behind in the process.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

from shoal.telemetry.tracking import HTTP_REQUEST_LIMITS

API = "/api/2.0/mlflow/"
RUN_ID = "0123456789abcdef"


def unset_http_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset MLflow's HTTP settings for a test, and have them as they were after it, whatever
    a tracker of an http URI sets meanwhile (for the whole process)."""
    for name in HTTP_REQUEST_LIMITS:
        monkeypatch.setenv(name, "unset")  # recorded, so that undoing restores the original
        monkeypatch.delenv(name)


@contextmanager
def closed_port() -> Iterator[int]:
    """A port of 127.0.0.1 bound but not listening: a connection to it is refused, and no
    other process takes it meanwhile."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


@contextmanager
def silent_server() -> Iterator[int]:
    """A port of 127.0.0.1 that accepts connections (the kernel's backlog does) and never
    answers a byte."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(64)
        yield listening.getsockname()[1]


class TrackingServer:
    """An MLflow tracking server for one run: it creates the experiment and the run, keeps the
    metrics logged to it (``metrics``: (key, step, value)), and answers any other call 404."""

    def __init__(self) -> None:
        self.metrics: list[tuple[str, int, float]] = []
        self.calls: list[str] = []
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def go_away(self) -> None:
        """Stop serving and close the port: a connection to it is refused from now on."""
        if self._thread.is_alive():
            self._http.shutdown()
            self._http.server_close()
            self._thread.join()

    def __enter__(self) -> TrackingServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.go_away()

    def answer(self, call: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The status and JSON body of the answer to ``call`` (the path after ``API``)."""
        self.calls.append(call)
        run_info = {"run_id": RUN_ID, "experiment_id": "1", "status": "RUNNING"}
        if call == "experiments/get-by-name":
            return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no experiment"}
        if call == "experiments/create":
            return 200, {"experiment_id": "1"}
        if call in ("runs/create", "runs/get"):
            return 200, {"run": {"info": run_info, "data": {}}}
        if call == "runs/log-batch":
            self.metrics += [
                (m["key"], int(m["step"]), m["value"]) for m in body.get("metrics", [])
            ]
            return 200, {}
        if call == "runs/update":
            return 200, {"run_info": {**run_info, "status": body["status"]}}
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": call}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._reply({})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self._reply(json.loads(self.rfile.read(length) or b"{}"))

            def _reply(self, body: dict[str, Any]) -> None:
                call = urlsplit(self.path).path.removeprefix(API)
                status, answer = server.answer(call, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test reads the calls, not a log

        return Handler
