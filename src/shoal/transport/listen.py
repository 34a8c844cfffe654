"""Binding a gRPC server to ``HOST:PORT``: a malformed address or one that cannot be bound is
one clear error, before anything is served.

gRPC reports only "Failed to bind" (after a log line of its own), wraps a
port past 65535 around to another one, and by default shares a port with
another gRPC server (``SO_REUSEPORT``): a second coordinator started on the
same port would silently split the clients with the first.
:func:`bind_server` checks the address (``ConfigError``: the user's
mistake), asks the operating system whether it can be bound
(``TransportError``: the host does not resolve, the port is taken, the
address is not this machine's), and only then gives it to gRPC. Servers
are made with :data:`EXCLUSIVE_PORT` and :data:`SILENT_CONNECTIONS_CLOSED` among their
options.
"""

from __future__ import annotations

import socket
from typing import Protocol

import grpc

from shoal.core.errors import ConfigError, TransportError
from shoal.core.limits import split_host_port

EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)
"""A gRPC server option: never share the port with another process."""

HANDSHAKE_TIMEOUT_S = 10.0
"""How long a new connection to a server has to finish its TLS handshake and HTTP/2 start:
gRPC's own 120 s let a peer hold a file descriptor per silent connection for two minutes."""

MAX_STREAMS_PER_CONNECTION = 32
"""Concurrent calls on one connection to a coordinator: a client makes a few at once."""

SILENT_CONNECTIONS_CLOSED = ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT_S * 1000))
"""A gRPC server option: :data:`HANDSHAKE_TIMEOUT_S`."""


class _Bindable(Protocol):
    """What a ``grpc.Server`` and a ``grpc.aio.Server`` share for listening."""

    def add_insecure_port(self, address: str) -> int: ...

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int: ...


def bind_server(
    server: _Bindable,
    address: str,
    credentials: grpc.ServerCredentials | None,
    *,
    option: str = "address",
) -> int:
    """Add ``address`` to ``server`` (TLS with ``credentials``, plaintext with None); the port.

    ``option`` names the setting in the error (``coordinator.listen``, ``--listen``).
    """
    try:
        host, port = split_host_port(address)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    reason = why_unbindable(host, port)
    if reason is None:
        try:
            bound = (
                server.add_insecure_port(address)
                if credentials is None
                else server.add_secure_port(address, credentials)
            )
        except RuntimeError:  # grpcio >= 1.59 raises where older versions returned 0
            bound = 0
        if bound != 0:
            return bound
        reason = "gRPC refused it (GRPC_VERBOSITY=debug tells more)"
    raise TransportError(f"{option}: cannot listen on {address}: {reason}")


def why_unbindable(host: str, port: int) -> str | None:
    """Why the operating system would refuse to listen on ``host:port``, or None if it would not."""
    try:
        found = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"the host {host!r} does not resolve ({getattr(exc, 'strerror', None) or exc})"
    for family, kind, protocol, _, where in found:
        try:
            with socket.socket(family, kind, protocol) as probe:
                # as gRPC binds: SO_REUSEADDR (the closed connections of a server killed a
                # moment ago do not count), but never SO_REUSEPORT (a listener does)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(where)
        except OSError as exc:
            return str(exc.strerror or exc)
    return None
