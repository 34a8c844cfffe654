"""Binding a gRPC server: a malformed address, a busy port, a foreign host, never a shared port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from shoal.core.errors import ConfigError, TransportError
from shoal.transport.listen import EXCLUSIVE_PORT, bind_server, why_unbindable


@pytest.fixture
def server() -> Iterator[grpc.Server]:
    made = grpc.server(ThreadPoolExecutor(max_workers=1), options=[EXCLUSIVE_PORT])
    yield made
    made.stop(None)


def test_a_free_port_is_bound(server: grpc.Server) -> None:
    port = bind_server(server, "127.0.0.1:0", None)
    assert port > 0 and why_unbindable("127.0.0.1", 0) is None


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "localhost", "x:y"])
def test_a_malformed_address_is_a_config_error_naming_the_option(
    server: grpc.Server, address: str
) -> None:
    with pytest.raises(ConfigError, match=r"^--listen: expected HOST:PORT"):
        bind_server(server, address, None, option="--listen")


def test_a_port_held_by_a_socket_is_refused_with_the_reason(server: grpc.Server) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(TransportError) as caught:
            bind_server(server, f"127.0.0.1:{port}", None, option="coordinator.listen")
    assert str(caught.value) == (
        f"coordinator.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_a_port_held_by_another_grpc_server_is_not_shared(server: grpc.Server) -> None:
    """gRPC's default SO_REUSEPORT would let both serve, each getting some of the clients."""
    other = grpc.server(ThreadPoolExecutor(max_workers=1))  # gRPC's defaults
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        with pytest.raises(TransportError, match="Address already in use"):
            bind_server(server, f"127.0.0.1:{port}", None)
    finally:
        other.stop(None)


def test_a_host_that_does_not_resolve_is_named(server: grpc.Server) -> None:
    with pytest.raises(TransportError, match=r"the host 'nowhere\.invalid' does not resolve"):
        bind_server(server, "nowhere.invalid:50051", None)


def test_a_port_a_killed_server_left_in_time_wait_can_be_bound_again(
    server: grpc.Server,
) -> None:
    """A coordinator restarted after kill -9 takes its port back at once, as gRPC allows."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's listeners
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server closes first: its side of the port waits in TIME_WAIT
        client.close()
    assert why_unbindable("127.0.0.1", port) is None
    assert bind_server(server, f"127.0.0.1:{port}", None) == port
