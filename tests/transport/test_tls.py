"""A real grpc.aio server on 127.0.0.1 with the generated service, the generated certificates,
signed requests and streamed models: who gets in, who is refused, and which TLS is spoken.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from shoal.core.errors import SecurityError
from shoal.core.parameters import Parameters
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport._generated import coordinator_pb2_grpc as pb_grpc
from shoal.transport.certs import (
    TLS13_ONLY_CIPHER_SUITES,
    CertificateFiles,
    DeploymentCertificates,
    TlsPeer,
    init_certificates,
    issue_client_certificate,
    load_channel_credentials,
    load_server_credentials,
    tls_peer,
)
from shoal.transport.chunks import ChunkAssembler, chunk_payload, decode_parameters
from shoal.transport.messages import DeviceState, HeartbeatReply, RejectCode, Verdict
from shoal.transport.signing import ReplayGuard, generate_client_key

T = TypeVar("T")
MODEL = Parameters.from_arrays([np.linspace(-1, 1, 5000).reshape(50, 100), np.ones(7)])
MODEL_BYTES = MODEL.to_bytes()
CHUNK_SIZE = 4096


class MiniCoordinator(pb_grpc.CoordinatorServicer):
    """Just enough of a coordinator: signed heartbeats and a streamed model."""

    def __init__(self, public_keys: dict[str, bytes]) -> None:
        self.public_keys = public_keys
        self.guard = ReplayGuard(window_s=60)
        self.peers: list[TlsPeer] = []

    async def Heartbeat(  # noqa: N802 (the generated servicer names it)
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HeartbeatResponse:
        self.peers.append(tls_peer(context.auth_context()))
        return serde.encode_heartbeat_response(HeartbeatReply(self._admit(request), 30.0))

    async def FetchModel(  # noqa: N802
        self, request: pb.FetchModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Chunk]:
        for chunk in chunk_payload(MODEL_BYTES, CHUNK_SIZE, start=request.offset):
            yield serde.encode_chunk(chunk)

    def _admit(self, request: pb.HeartbeatRequest) -> Verdict:
        auth = serde.decode_auth(request)
        key = self.public_keys.get(auth.client_id)
        if key is None:
            return Verdict.reject(RejectCode.UNKNOWN_CLIENT, auth.client_id)
        try:
            serde.verify_message(request, key)
        except SecurityError as exc:
            return Verdict.reject(RejectCode.BAD_SIGNATURE, str(exc))
        try:
            self.guard.check(auth, key=key, now=time.time())
        except SecurityError as exc:
            return Verdict.reject(RejectCode.REPLAYED, str(exc))
        serde.decode_heartbeat_request(request)
        return Verdict.accept()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> DeploymentCertificates:
    return init_certificates(tmp_path_factory.mktemp("deployment"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> DeploymentCertificates:
    """Another deployment: its CA and certificates must be worth nothing here."""
    return init_certificates(tmp_path_factory.mktemp("stranger"))


@pytest.fixture(scope="module")
def client_cert(
    deployment: DeploymentCertificates, tmp_path_factory: pytest.TempPathFactory
) -> CertificateFiles:
    folder = tmp_path_factory.mktemp("client")
    return issue_client_certificate(deployment.ca.certificate.parent, "client-7", folder)


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_client_key()


def run_with_server(
    server_credentials: grpc.ServerCredentials,
    servicer: MiniCoordinator,
    body: Callable[[str], Awaitable[T]],
) -> T:
    """Start a TLS server on 127.0.0.1 (a free port), run ``body(target)``, stop the server."""

    async def main() -> T:
        server = grpc.aio.server()
        pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials)
        await server.start()
        try:
            return await body(f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    return asyncio.run(main())


def heartbeat_request(private_key: bytes, client_id: str = "client-7") -> pb.HeartbeatRequest:
    request = serde.encode_heartbeat_request(DeviceState(device_class="phone", battery_level=0.8))
    serde.sign_message(
        request, private_key, client_id=client_id, run_id="run-1", round=-1, timestamp=time.time()
    )
    return request


async def heartbeat(
    target: str, credentials: grpc.ChannelCredentials, request: pb.HeartbeatRequest
) -> HeartbeatReply:
    async with grpc.aio.secure_channel(target, credentials) as channel:
        response = await pb_grpc.CoordinatorStub(channel).Heartbeat(request, timeout=10)
    return serde.decode_heartbeat_response(response)


def test_a_client_trusting_the_ca_talks_tls13(
    deployment: DeploymentCertificates, keys: tuple[bytes, bytes]
) -> None:
    servicer = MiniCoordinator({"client-7": keys[1]})
    credentials = load_channel_credentials(deployment.ca.certificate)
    reply = run_with_server(
        load_server_credentials(deployment.server),
        servicer,
        lambda target: heartbeat(target, credentials, heartbeat_request(keys[0])),
    )
    assert reply == HeartbeatReply(Verdict.accept(), 30.0)
    (peer,) = servicer.peers
    assert peer.tls_version == "TLSv1.3"
    assert peer.common_name is None  # no client certificate without mutual TLS


def test_signed_requests_over_tls_refuse_forgery_replay_and_strangers(
    deployment: DeploymentCertificates, keys: tuple[bytes, bytes]
) -> None:
    servicer = MiniCoordinator({"client-7": keys[1]})
    credentials = load_channel_credentials(deployment.ca.certificate)
    replayed = heartbeat_request(keys[0])
    forged = heartbeat_request(generate_client_key()[0])  # signed with someone else's key
    unknown = heartbeat_request(keys[0], client_id="client-8")

    async def body(target: str) -> list[HeartbeatReply]:
        requests = [replayed, replayed, forged, unknown]
        return [await heartbeat(target, credentials, request) for request in requests]

    replies = run_with_server(load_server_credentials(deployment.server), servicer, body)
    codes = [reply.verdict.code for reply in replies]
    assert codes == [None, RejectCode.REPLAYED, RejectCode.BAD_SIGNATURE, RejectCode.UNKNOWN_CLIENT]


def test_a_model_streams_in_chunks_and_verifies(
    deployment: DeploymentCertificates, keys: tuple[bytes, bytes]
) -> None:
    credentials = load_channel_credentials(deployment.ca.certificate)

    async def fetch(target: str, offset: int, prefix: bytes) -> tuple[bytes, int]:
        assembler = ChunkAssembler(max_bytes=10**7, prefix=prefix)
        request = pb.FetchModelRequest(version_id="v1", offset=offset)
        count = 0
        async with grpc.aio.secure_channel(target, credentials) as channel:
            async for message in pb_grpc.CoordinatorStub(channel).FetchModel(request, timeout=10):
                assembler.add(serde.decode_chunk(message))
                count += 1
        return assembler.finish(), count

    async def body(target: str) -> list[tuple[bytes, int]]:
        resume_at = 3 * CHUNK_SIZE + 5
        return [
            await fetch(target, 0, b""),
            await fetch(target, resume_at, MODEL_BYTES[:resume_at]),
        ]

    servicer = MiniCoordinator({})
    results = run_with_server(load_server_credentials(deployment.server), servicer, body)
    for data, _ in results:
        assert data == MODEL_BYTES
        restored = decode_parameters(data, expected_sha256=MODEL.sha256())
        np.testing.assert_array_equal(restored.vector, MODEL.vector)
    assert results[0][1] == -(-len(MODEL_BYTES) // CHUNK_SIZE) > 1
    assert results[1][1] < results[0][1]


def refused(
    server_credentials: grpc.ServerCredentials,
    channel_credentials: grpc.ChannelCredentials,
    private_key: bytes,
) -> grpc.StatusCode:
    async def body(target: str) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await heartbeat(target, channel_credentials, heartbeat_request(private_key))
        return caught.value.code()

    servicer = MiniCoordinator({})
    code = run_with_server(server_credentials, servicer, body)
    assert not servicer.peers, "the handshake must fail before any request is served"
    return code


def test_a_client_trusting_another_ca_is_refused(
    deployment: DeploymentCertificates, stranger: DeploymentCertificates, keys: tuple[bytes, bytes]
) -> None:
    code = refused(
        load_server_credentials(deployment.server),
        load_channel_credentials(stranger.ca.certificate),
        keys[0],
    )
    assert code is grpc.StatusCode.UNAVAILABLE


def test_a_server_with_another_deployments_certificate_is_refused(
    deployment: DeploymentCertificates, stranger: DeploymentCertificates, keys: tuple[bytes, bytes]
) -> None:
    """An impostor with a valid certificate for 127.0.0.1, but from another CA."""
    code = refused(
        load_server_credentials(stranger.server),
        load_channel_credentials(deployment.ca.certificate),
        keys[0],
    )
    assert code is grpc.StatusCode.UNAVAILABLE


def test_a_client_can_pin_the_coordinator_certificate_itself(
    deployment: DeploymentCertificates, stranger: DeploymentCertificates, keys: tuple[bytes, bytes]
) -> None:
    pinned = load_channel_credentials(deployment.server.certificate)
    servicer = MiniCoordinator({"client-7": keys[1]})
    reply = run_with_server(
        load_server_credentials(deployment.server),
        servicer,
        lambda target: heartbeat(target, pinned, heartbeat_request(keys[0])),
    )
    assert reply.verdict.accepted
    # the same CA signed the stranger's server: pinning a certificate refuses it all the same
    pinned_stranger = load_channel_credentials(stranger.server.certificate)
    code = refused(load_server_credentials(deployment.server), pinned_stranger, keys[0])
    assert code is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_admits_a_client_certificate_and_names_the_client(
    deployment: DeploymentCertificates, client_cert: CertificateFiles, keys: tuple[bytes, bytes]
) -> None:
    servicer = MiniCoordinator({"client-7": keys[1]})
    server_credentials = load_server_credentials(
        deployment.server, client_ca=deployment.ca.certificate
    )
    credentials = load_channel_credentials(client_cert.certificate.parent / "ca.pem", client_cert)
    reply = run_with_server(
        server_credentials,
        servicer,
        lambda target: heartbeat(target, credentials, heartbeat_request(keys[0])),
    )
    assert reply.verdict.accepted
    assert servicer.peers[0].common_name == "client-7"
    assert servicer.peers[0].tls_version == "TLSv1.3"


def test_mutual_tls_refuses_a_client_without_a_certificate(
    deployment: DeploymentCertificates, keys: tuple[bytes, bytes]
) -> None:
    server_credentials = load_server_credentials(
        deployment.server, client_ca=deployment.ca.certificate
    )
    code = refused(server_credentials, load_channel_credentials(deployment.ca.certificate), keys[0])
    assert code is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_from_another_ca(
    deployment: DeploymentCertificates,
    stranger: DeploymentCertificates,
    keys: tuple[bytes, bytes],
    tmp_path: Path,
) -> None:
    foreign = issue_client_certificate(stranger.ca.certificate.parent, "client-7", tmp_path)
    server_credentials = load_server_credentials(
        deployment.server, client_ca=deployment.ca.certificate
    )
    credentials = load_channel_credentials(deployment.ca.certificate, foreign)
    assert refused(server_credentials, credentials, keys[0]) is grpc.StatusCode.UNAVAILABLE


# --- which TLS versions the server accepts -------------------------------------------

SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import grpc
    from pathlib import Path
    from shoal.transport.certs import CertificateFiles, load_server_credentials

    async def main():
        folder = Path(sys.argv[1])
        server = grpc.aio.server()
        credentials = load_server_credentials(
            CertificateFiles(folder / "server.pem", folder / "server.key")
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(None)

    asyncio.run(main())
    """
)


def negotiated(folder: Path, environment: dict[str, str], versions: list[str]) -> list[str | None]:
    """The protocol ``openssl s_client`` agrees on with a fresh server, per requested version."""
    env = {key: value for key, value in os.environ.items() if key != "GRPC_SSL_CIPHER_SUITES"}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env | environment,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        results: list[str | None] = []
        for version in versions:
            command = ["openssl", "s_client", "-brief", "-connect", f"127.0.0.1:{port}"]
            command += [version, "-alpn", "h2", "-CAfile", str(folder / "ca.pem")]
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=20,
                check=False,
            )
            # stdout holds the server's raw HTTP/2 frames too: only the report is text
            lines = (done.stdout + done.stderr).decode(errors="replace").splitlines()
            protocol = [
                line.split(":", 1)[1].strip() for line in lines if "Protocol version" in line
            ]
            results.append(protocol[0] if done.returncode == 0 and protocol else None)
        return results
    finally:
        try:
            server.communicate(input="", timeout=20)  # closing stdin stops the server
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_by_default_grpc_python_accepts_tls12_as_well_as_tls13(
    deployment: DeploymentCertificates,
) -> None:
    """A finding, not a wish: gRPC Python has no option for a minimum TLS version.

    If this starts failing, gRPC refuses TLS 1.2 by itself: update DESIGN.md.
    """
    folder = deployment.ca.certificate.parent
    assert negotiated(folder, {}, ["-tls1_2", "-tls1_3"]) == ["TLSv1.2", "TLSv1.3"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_tls12_cipher_list_with_no_usable_suite_leaves_only_tls13(
    deployment: DeploymentCertificates,
) -> None:
    """``GRPC_SSL_CIPHER_SUITES`` set, before grpc is imported, to a PSK-only TLS 1.2 suite
    (gRPC configures no PSK, so it is never chosen): TLS 1.2 handshakes fail, and TLS 1.3,
    whose suites BoringSSL does not let anyone configure, is untouched.
    """
    folder = deployment.ca.certificate.parent
    environment = {"GRPC_SSL_CIPHER_SUITES": TLS13_ONLY_CIPHER_SUITES}
    assert negotiated(folder, environment, ["-tls1_2", "-tls1_3"]) == [None, "TLSv1.3"]
