"""The key holder over real gRPC on 127.0.0.1: TLS, refusals as typed errors, `shoal keyholder`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.core.errors import ConfigError, ProtocolError, SecurityError, TransportError
from shoal.secure.ckks import EncryptedVector, encrypt_vector, sum_encrypted
from shoal.secure.keyholder import ContributionReceipt, KeyHolder, sign_receipt
from shoal.transport.certs import (
    CA_CERTIFICATE,
    init_certificates,
    issue_client_certificate,
)
from shoal.transport.keyholder_service import (
    DECRYPT_METHOD,
    PUBLIC_CONTEXT_METHOD,
    KeyHolderClient,
    KeyHolderServer,
    decode_decrypt_request,
    encode_decrypt_request,
    serve_keyholder,
)
from shoal.transport.signing import generate_client_key

pytest.importorskip("tenseal")

RUN = "run-1"
HE_TOLERANCE = 1e-3  # CKKS error ~1e-8 plus flooding noise of std 1.5e-5 (see test_keyholder)
SILO_KEYS = {f"silo-{index}": generate_client_key() for index in range(3)}
PUBLIC_KEYS = {silo: public for silo, (_, public) in SILO_KEYS.items()}


def contributions(
    public_context: bytes, *, round: int, length: int = 100
) -> tuple[np.ndarray, EncryptedVector, list[ContributionReceipt]]:
    """The plaintext sum, the encrypted sum, and the receipts of every silo for one round."""
    rng = np.random.default_rng(round)
    updates = {silo: rng.uniform(-1, 1, length) for silo in SILO_KEYS}
    ciphertexts = {silo: encrypt_vector(public_context, u) for silo, u in updates.items()}
    receipts = [
        sign_receipt(
            SILO_KEYS[silo][0],
            run_id=RUN,
            round=round,
            silo_id=silo,
            ciphertext_sha256=ciphertext.sha256(),
        )
        for silo, ciphertext in ciphertexts.items()
    ]
    total = sum_encrypted(public_context, list(ciphertexts.values()))
    return np.sum(list(updates.values()), axis=0), total, receipts


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    KeyHolder.init(tmp_path / "keyholder", min_contributors=2, silos=PUBLIC_KEYS)
    return tmp_path / "keyholder"


@pytest.fixture
def server(folder: Path) -> Iterator[KeyHolderServer]:
    with serve_keyholder(folder, address="127.0.0.1:0", insecure=True) as running:
        yield running


@pytest.fixture
def client(server: KeyHolderServer) -> Iterator[KeyHolderClient]:
    with KeyHolderClient(server.address, insecure=True, timeout_s=30) as connected:
        yield connected


def test_public_context_and_decryption_over_grpc(folder: Path, client: KeyHolderClient) -> None:
    public = client.public_context()
    assert public == KeyHolder.open(folder).public_context()
    expected, aggregate, receipts = contributions(public, round=1, length=10_000)
    assert len(aggregate.chunks) == 3  # longer than one ciphertext
    total = client.decrypt_aggregate(run_id=RUN, round=1, aggregate=aggregate, receipts=receipts)
    assert total.dtype == np.float64
    np.testing.assert_allclose(total, expected, rtol=0, atol=HE_TOLERANCE)


def test_refusals_come_back_as_security_errors(client: KeyHolderClient) -> None:
    public = client.public_context()
    _, aggregate, receipts = contributions(public, round=1)
    with pytest.raises(SecurityError, match="at least 2 distinct silos, got 1"):
        client.decrypt_aggregate(run_id=RUN, round=1, aggregate=aggregate, receipts=receipts[:1])
    with pytest.raises(SecurityError, match="not run 'run-1' round 2"):
        client.decrypt_aggregate(run_id=RUN, round=2, aggregate=aggregate, receipts=receipts)
    client.decrypt_aggregate(run_id=RUN, round=1, aggregate=aggregate, receipts=receipts)
    with pytest.raises(SecurityError, match="decrypted already"):
        client.decrypt_aggregate(run_id=RUN, round=1, aggregate=aggregate, receipts=receipts[:2])
    _, aggregate, receipts = contributions(public, round=3)
    altered = bytearray(aggregate.chunks[0])
    altered[10] ^= 0x01
    tampered = EncryptedVector(aggregate.length, (bytes(altered),))
    with pytest.raises(SecurityError, match="not valid"):
        client.decrypt_aggregate(run_id=RUN, round=3, aggregate=tampered, receipts=receipts)


def test_malformed_requests_are_invalid_arguments(server: KeyHolderServer) -> None:
    with KeyHolderClient(server.address, insecure=True) as client:
        _, aggregate, receipts = contributions(client.public_context(), round=1)
        request = encode_decrypt_request(
            run_id=RUN, round=1, aggregate=aggregate, receipts=receipts
        )
        assert decode_decrypt_request(request).receipts == tuple(receipts)
    with grpc.insecure_channel(server.address) as channel:
        decrypt: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(DECRYPT_METHOD)
        public: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            PUBLIC_CONTEXT_METHOD
        )
        calls = [(decrypt, g) for g in (b"", b"nonsense", request[:-1], request + b"\x00")]
        for method, garbage in [*calls, (public, b"x")]:
            with pytest.raises(grpc.RpcError) as caught:
                method(garbage, timeout=10)
            assert isinstance(caught.value, grpc.Call)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_client_maps_invalid_argument_to_protocol_error(server: KeyHolderServer) -> None:
    with KeyHolderClient(server.address, insecure=True) as client:
        public = client.public_context()
        _, aggregate, receipts = contributions(public, round=1)
        wrong_length = EncryptedVector(aggregate.length - 1, aggregate.chunks)
        with pytest.raises(ProtocolError, match="rejected the request"):
            client.decrypt_aggregate(run_id=RUN, round=1, aggregate=wrong_length, receipts=receipts)


def test_unreachable_key_holder_is_a_transport_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening
        with KeyHolderClient(f"127.0.0.1:{port}", insecure=True, timeout_s=2) as client:
            with pytest.raises(TransportError, match="UNAVAILABLE"):
                client.public_context()
            with pytest.raises(TransportError, match="not reachable"):
                client.wait_ready(timeout_s=0.5)


def test_tls_or_insecure_must_be_chosen(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        serve_keyholder(folder)
    with pytest.raises(ConfigError, match="exactly one"):
        KeyHolderClient("127.0.0.1:1")
    with pytest.raises(ConfigError, match="needs a server certificate"):
        serve_keyholder(folder, insecure=True, client_ca=tmp_path / "ca.pem")


def test_tls_and_mutual_tls(folder: Path, tmp_path: Path) -> None:
    certs = init_certificates(tmp_path / "certs")
    client_files = issue_client_certificate(tmp_path / "certs", "coordinator", tmp_path / "client")
    ca = certs.ca.certificate
    with serve_keyholder(folder, server_certificate=certs.server) as server:
        with KeyHolderClient(server.address, ca=ca) as client:
            public = client.public_context()
            expected, aggregate, receipts = contributions(public, round=1)
            total = client.decrypt_aggregate(
                run_id=RUN, round=1, aggregate=aggregate, receipts=receipts
            )
            np.testing.assert_allclose(total, expected, atol=HE_TOLERANCE)
        with (
            KeyHolderClient(server.address, insecure=True, timeout_s=5) as plaintext,
            pytest.raises(TransportError),
        ):
            plaintext.public_context()
    with serve_keyholder(folder, server_certificate=certs.server, client_ca=ca) as server:
        with (
            KeyHolderClient(server.address, ca=ca, timeout_s=5) as anonymous,
            pytest.raises(TransportError),
        ):
            anonymous.public_context()
        with KeyHolderClient(server.address, ca=ca, client_certificate=client_files) as client:
            assert client.public_context() == public


# --- the command line --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_cli_init_and_serve_as_a_real_process(tmp_path: Path) -> None:
    silos_file = tmp_path / "silos.json"
    silos_file.write_text(json.dumps({"silo-2": PUBLIC_KEYS["silo-2"].hex()}))
    folder = tmp_path / "keyholder"
    result = CliRunner().invoke(
        app,
        [
            "keyholder", "init", "--dir", str(folder), "--min-contributors", "2",
            "--silo", f"silo-0={PUBLIC_KEYS['silo-0'].hex()}",
            "--silo", f"silo-1={PUBLIC_KEYS['silo-1'].hex()}",
            "--silos-file", str(silos_file), "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["silos"] == 3
    init_certificates(tmp_path / "certs")
    port = free_port()
    command = [
        sys.executable, "-m", "shoal", "keyholder", "serve", "--dir", str(folder),
        "--listen", f"127.0.0.1:{port}", "--certificates", str(tmp_path / "certs"),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with KeyHolderClient(
            f"127.0.0.1:{port}", ca=tmp_path / "certs" / CA_CERTIFICATE, timeout_s=30
        ) as client:
            client.wait_ready(timeout_s=60)
            public = client.public_context()
            assert (
                summary["public_context_sha256"] == KeyHolder.open(folder).public_context_sha256()
            )
            expected, aggregate, receipts = contributions(public, round=7)
            total = client.decrypt_aggregate(
                run_id=RUN, round=7, aggregate=aggregate, receipts=receipts
            )
            np.testing.assert_allclose(total, expected, atol=HE_TOLERANCE)
            with pytest.raises(SecurityError, match="decrypted already"):
                client.decrypt_aggregate(
                    run_id=RUN, round=7, aggregate=aggregate, receipts=receipts
                )
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output.decode()
    assert f"listening on 127.0.0.1:{port}" in output.decode()
    assert "key holder stopped" in output.decode()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--silo", "no-equals-sign"], "NAME=HEX"),
        (["--silo", "a=zz", "--silo", "b=00"], "not hex"),
        (["--silo", f"a={'00' * 31}", "--silo", f"b={'00' * 32}"], "silo 'a'"),
        ([], "needs its silos"),
        (["--silo", f"a={PUBLIC_KEYS['silo-0'].hex()}"], "min_contributors"),
        (["--silo", f"a={PUBLIC_KEYS['silo-0'].hex()}", "--scale-bits", "70"], "global_scale"),
    ],
)
def test_cli_init_errors_are_one_line(tmp_path: Path, arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(
        app,
        ["keyholder", "init", "--dir", str(tmp_path / "k"), "--min-contributors", "2", *arguments],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_serve_needs_tls_or_insecure(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["keyholder", "serve", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--insecure" in result.output
