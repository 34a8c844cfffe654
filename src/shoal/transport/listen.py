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
are made with :data:`EXCLUSIVE_PORT` among their options.
"""

from __future__ import annotations

import socket
from typing import Protocol

import grpc

from shoal.core.errors import ConfigError, TransportError
from shoal.core.limits import split_host_port

EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)
"""A gRPC server option: never share the port with another process."""


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
