"""Certificates: the chain verifies, extensions say what each one is for, keys stay private."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from shoal.core.errors import ConfigError, SecurityError
from shoal.governance import key_id_of, load_public_key, load_signing_key
from shoal.transport.certs import (
    CertificateFiles,
    DeploymentCertificates,
    init_certificates,
    issue_client_certificate,
    load_channel_credentials,
    load_server_credentials,
    tls_peer,
)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> DeploymentCertificates:
    folder = tmp_path_factory.mktemp("certs")
    return init_certificates(folder, hosts=("localhost", "127.0.0.1", "fl.example.org", "::1"))


@pytest.fixture(scope="module")
def client(
    deployment: DeploymentCertificates, tmp_path_factory: pytest.TempPathFactory
) -> CertificateFiles:
    folder = tmp_path_factory.mktemp("client")
    return issue_client_certificate(deployment.ca.certificate.parent, "client-42", folder)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_server_chain_verifies_for_each_host(deployment: DeploymentCertificates) -> None:
    store = Store([load(deployment.ca.certificate)])
    leaf = load(deployment.server.certificate)
    for name in ("localhost", "fl.example.org"):
        verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
        chain = verifier.verify(leaf, [])
        assert chain[-1] == load(deployment.ca.certificate)
    for address in ("127.0.0.1", "::1"):
        ip = x509.IPAddress(ipaddress.ip_address(address))
        PolicyBuilder().store(store).build_server_verifier(ip).verify(leaf, [])


def test_the_server_certificate_is_not_valid_for_other_hosts(
    deployment: DeploymentCertificates,
) -> None:
    store = Store([load(deployment.ca.certificate)])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example"))
    with pytest.raises(VerificationError):
        verifier.verify(load(deployment.server.certificate), [])


def test_another_ca_does_not_verify_the_server(
    deployment: DeploymentCertificates, tmp_path: Path
) -> None:
    other = init_certificates(tmp_path)
    store = Store([load(other.ca.certificate)])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(VerificationError):
        verifier.verify(load(deployment.server.certificate), [])


def test_the_client_chain_verifies_as_a_client_certificate(
    deployment: DeploymentCertificates, client: CertificateFiles
) -> None:
    store = Store([load(deployment.ca.certificate)])
    verified = (
        PolicyBuilder().store(store).build_client_verifier().verify(load(client.certificate), [])
    )
    assert verified.subjects == [x509.UniformResourceIdentifier("urn:shoal:client:client-42")]


def test_extensions_say_what_each_certificate_is_for(
    deployment: DeploymentCertificates, client: CertificateFiles
) -> None:
    ca, server, leaf = (
        load(deployment.ca.certificate),
        load(deployment.server.certificate),
        load(client.certificate),
    )
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for cert in (server, leaf):
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server_usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    client_usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(server_usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(client_usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    for cert in (ca, server, leaf):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.not_valid_before_utc <= dt.datetime.now(dt.UTC) <= cert.not_valid_after_utc


def test_keys_are_private_to_their_owner(
    deployment: DeploymentCertificates, client: CertificateFiles
) -> None:
    keys = (deployment.ca.private_key, deployment.server.private_key, client.private_key)
    for key in (*keys, deployment.signing_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(deployment.server.certificate.stat().st_mode) == 0o644
    assert stat.S_IMODE(deployment.signing_public_key.stat().st_mode) == 0o644


def test_the_deployment_holds_the_model_signing_pair_clients_pin(
    deployment: DeploymentCertificates,
) -> None:
    key = load_signing_key(deployment.signing_key)
    pinned = load_public_key(deployment.signing_public_key)
    assert pinned.key_id == key_id_of(key.public_key())
    assert deployment.signing_public_key.parent == deployment.ca.certificate.parent


def test_the_client_folder_holds_the_ca_to_pin(
    deployment: DeploymentCertificates, client: CertificateFiles
) -> None:
    pinned = client.certificate.parent / "ca.pem"
    assert pinned.read_bytes() == deployment.ca.certificate.read_bytes()


def test_existing_files_are_not_overwritten(tmp_path: Path) -> None:
    first = init_certificates(tmp_path)
    ca_before = first.ca.private_key.read_bytes()
    with pytest.raises(SecurityError, match="refusing to overwrite"):
        init_certificates(tmp_path)
    assert first.ca.private_key.read_bytes() == ca_before
    second = init_certificates(tmp_path, overwrite=True)
    assert second.ca.private_key.read_bytes() != ca_before


def test_no_host_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="at least one host"):
        init_certificates(tmp_path, hosts=())


@pytest.mark.parametrize(
    "host", ["bad host", "", ".", "-a", "a-", "a..b", "x" * 64, "a_b.example", "\u202elocal"]
)
def test_bad_hosts_are_refused_before_anything_is_written(tmp_path: Path, host: str) -> None:
    """Each is a name no TLS client could match; the empty one and non-ASCII ones used to
    raise from inside cryptography."""
    with pytest.raises(ConfigError, match="not a host name or IP address"):
        init_certificates(tmp_path / "certs", hosts=("localhost", host))
    assert not (tmp_path / "certs").exists()


def test_a_non_ascii_host_name_is_certified_in_its_idna_form(tmp_path: Path) -> None:
    deployment = init_certificates(tmp_path, hosts=("bücher.example",))
    store = Store([load(deployment.ca.certificate)])
    verifier = (
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("xn--bcher-kva.example"))
    )
    verifier.verify(load(deployment.server.certificate), [])


@pytest.mark.parametrize("client_id", ["", "x" * 65])
def test_client_ids_must_fit_a_common_name(
    deployment: DeploymentCertificates, tmp_path: Path, client_id: str
) -> None:
    with pytest.raises(SecurityError, match="client id"):
        issue_client_certificate(deployment.ca.certificate.parent, client_id, tmp_path)


def test_credentials_load_from_the_generated_files(
    deployment: DeploymentCertificates, client: CertificateFiles
) -> None:
    assert isinstance(load_server_credentials(deployment.server), grpc.ServerCredentials)
    mutual = load_server_credentials(deployment.server, client_ca=deployment.ca.certificate)
    assert isinstance(mutual, grpc.ServerCredentials)
    assert isinstance(load_channel_credentials(deployment.ca.certificate), grpc.ChannelCredentials)
    pem = deployment.ca.certificate.read_bytes()
    assert isinstance(load_channel_credentials(pem, client), grpc.ChannelCredentials)


def test_a_key_that_is_not_the_certificates_is_refused(
    deployment: DeploymentCertificates, client: CertificateFiles
) -> None:
    mismatched = CertificateFiles(deployment.server.certificate, client.private_key)
    with pytest.raises(SecurityError, match="is not the key of"):
        load_server_credentials(mismatched)


def test_unreadable_or_garbage_files_are_security_errors(
    deployment: DeploymentCertificates, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(SecurityError, match="not a PEM certificate"):
        load_channel_credentials(garbage)
    with pytest.raises(SecurityError, match="not a PEM certificate"):
        load_channel_credentials(b"junk")
    with pytest.raises(SecurityError, match="cannot read"):
        load_channel_credentials(tmp_path / "missing.pem")
    with pytest.raises(SecurityError, match="private key"):
        load_server_credentials(CertificateFiles(deployment.server.certificate, garbage))


def test_tls_peer_reads_an_auth_context() -> None:
    peer = tls_peer(
        {
            "ssl_tls_version": [b"TLSv1.3"],
            "ssl_negotiated_key_exchange_group": [b"X25519MLKEM768"],
            "x509_common_name": [b"client-42"],
        }
    )
    assert (peer.tls_version, peer.key_exchange_group, peer.common_name) == (
        "TLSv1.3",
        "X25519MLKEM768",
        "client-42",
    )
    assert tls_peer({}).tls_version is None
