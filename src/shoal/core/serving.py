"""The stdlib HTTP servers' guards against slow and numerous peers, and a Host header's name.

The dashboard (:mod:`http.server`) and Prometheus' ``/metrics``
(:mod:`wsgiref`) start a thread per connection and, by themselves, wait on
it for ever: a peer that opens connections and never finishes a request
(slowloris) holds as many threads as it likes. A server built with
:class:`BoundedThreadingMixIn` closes a connection silent for
``request_timeout_s`` and, with ``max_connections`` open, closes a new one
unanswered; a connection that breaks costs a debug line, not a traceback on
the operator's terminal.

:func:`host_name` reads the name a request was sent to and
:func:`is_loopback` tells a loopback name or address, so that a server bound
to loopback can refuse the names a DNS-rebinding page would send.
"""

from __future__ import annotations

import logging
import resource
import threading
from socketserver import BaseRequestHandler, ThreadingMixIn
from typing import Any

from shoal.core.limits import is_loopback as is_loopback_address

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
"""How long a connection may stay silent (or refuse to read) before it is closed."""
MAX_CONNECTIONS = 64
"""Connections served at once; past it a new one is closed unanswered."""
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class BoundedThreadingMixIn(ThreadingMixIn):
    """A thread per connection, at most ``max_connections`` of them, none silent for longer
    than ``request_timeout_s``; put it before the server class
    (``class Server(BoundedThreadingMixIn, HTTPServer)``)."""

    daemon_threads = True

    def __init__(
        self,
        server_address: Any,
        handler: type[BaseRequestHandler],
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.request_timeout_s = request_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(server_address, handler)  # type: ignore[call-arg]

    def get_request(self) -> tuple[Any, Any]:
        request, address = super().get_request()  # type: ignore[misc]
        request.settimeout(self.request_timeout_s)  # every read and write of the connection
        return request, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("%s: closed unanswered, every connection slot is taken", client_address)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (its peer gone, silent past the timeout): one debug line."""
        log.debug("the connection of %s failed", client_address, exc_info=True)


def host_name(header: str | None, *, default: str) -> str:
    """The name in a request's Host header, its port left out (``default`` without one).

    >>> host_name("localhost:8050", default=""), host_name("[::1]:80", default="")
    ('localhost', '::1')
    >>> host_name("::1", default=""), host_name(None, default="127.0.0.1")
    ('::1', '127.0.0.1')
    """
    if not header:
        return default
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is loopback: a
    Host header's name in any case and any of the names a machine gives its loopback, else an
    address as :func:`shoal.core.limits.is_loopback` (the bind check's) reads it.

    >>> is_loopback("LOCALHOST"), is_loopback("[::1]"), is_loopback("rebound.example")
    (True, True, False)
    """
    name = host.strip().strip("[]").lower()
    return name in LOOPBACK_NAMES or is_loopback_address(name)


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the limit.

    A server's every connection is a file descriptor, and so are the files it writes: at the
    1,024 that many systems give a process by default, a few hundred silent connections made
    a coordinator refuse honest clients (gRPC retries its ``accept`` each second) and could
    fail its own commits. The hard limit is the operator's to set (systemd's
    ``LimitNOFILE``, ``ulimit -Hn``); below 4,096 it is warned about.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:  # a sandbox may refuse: serve within the soft one
            log.warning("could not raise the open files limit from %d to %d: %s", soft, hard, error)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        log.warning(
            "this process may open %d files: each connection takes one, so a few hundred "
            "idle peers can keep clients out (raise the hard limit: ulimit -Hn, LimitNOFILE)",
            soft,
        )
    return soft
