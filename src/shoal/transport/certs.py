"""Certificates for the coordinator's TLS: a deployment CA, the server's certificate, client ones.

``init_certificates`` makes a private CA and a coordinator certificate signed
by it; ``issue_client_certificate`` signs a client certificate for mutual TLS.
Keys are ECDSA P-256, which every TLS stack (gRPC's BoringSSL included)
accepts; they are written with mode 0600, certificates with 0644. The
``load_*`` functions check the PEM files and build gRPC credentials: a client
trusts only the CA (or the certificate) it was given, never the system roots.

Layout of a certificate folder::

    ca.pem  ca.key          the deployment CA (keep ca.key off the coordinator)
    server.pem  server.key  the coordinator (serverAuth, SAN = the hosts)
    client.pem  client.key  a client (clientAuth), with a copy of ca.pem beside it

TLS versions: gRPC Python negotiates TLS 1.3 (with the X25519MLKEM768 hybrid
key exchange between gRPC peers) but also accepts TLS 1.2, and has no option
for a minimum version. Setting ``GRPC_SSL_CIPHER_SUITES`` to
:data:`TLS13_ONLY_CIPHER_SUITES` in the environment *before grpc is first
imported* refuses TLS 1.2: that list holds only a PSK suite, which gRPC never
negotiates, and TLS 1.3 suites are not configurable in BoringSSL. Ed25519
certificates are refused by gRPC's handshake (no common signature algorithm),
hence ECDSA P-256.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.core.errors import ConfigError, SecurityError
from shoal.core.folders import writable_folder
from shoal.core.identifiers import check_client_id
from shoal.governance.model_signing import (
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    generate_signing_key,
    public_pem,
)

CA_CERTIFICATE = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERTIFICATE = "server.pem"
SERVER_KEY = "server.key"
CLIENT_CERTIFICATE = "client.pem"
CLIENT_KEY = "client.key"

TLS13_ONLY_CIPHER_SUITES = "ECDHE-PSK-CHACHA20-POLY1305"
"""A value of ``GRPC_SSL_CIPHER_SUITES`` that leaves gRPC no usable TLS 1.2 suite."""

_CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates start a little in the past
_MAX_COMMON_NAME = 64  # the X.509 upper bound
MAX_CERTIFICATE_DAYS = 36_500
"""The longest validity Shoal signs: a hundred years (a longer one overflows the calendar)."""


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """A PEM certificate and the PEM file of its private key."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True, slots=True)
class DeploymentCertificates:
    """What ``init_certificates`` wrote: the CA, the coordinator's certificate, and the
    coordinator's model-signing key pair (clients pin its public half beside the CA)."""

    ca: CertificateFiles
    server: CertificateFiles
    signing_key: Path
    signing_public_key: Path


def init_certificates(
    out_dir: str | Path,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 397,
    ca_days: int = 3650,
    overwrite: bool = False,
) -> DeploymentCertificates:
    """Make a deployment CA and a coordinator certificate for ``hosts`` in ``out_dir``.

    Each host becomes a subjectAltName entry (an IP address when it parses
    as one, a DNS name otherwise). Raises ``SecurityError`` rather than
    overwrite existing files unless ``overwrite`` is set.

    >>> files = init_certificates("certs", hosts=["fl.example.com"])  # doctest: +SKIP
    """
    if not hosts:
        raise SecurityError("a server certificate needs at least one host name or address")
    names = [_general_name(host) for host in hosts]  # before a key is made or a file written
    folder = writable_folder(out_dir, what="certificate folder")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Shoal deployment CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), days=ca_days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(certificate_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    common_name = str(names[0].value)[:_MAX_COMMON_NAME]
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    server_cert = (
        _leaf_builder(server_name, ca_cert, ca_key, server_key.public_key(), days=days)
        .add_extension(x509.SubjectAlternativeName(names), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca = CertificateFiles(folder / CA_CERTIFICATE, folder / CA_KEY)
    server = CertificateFiles(folder / SERVER_CERTIFICATE, folder / SERVER_KEY)
    for files, cert, key in ((ca, ca_cert, ca_key), (server, server_cert, server_key)):
        _write(files.private_key, _key_pem(key), mode=0o600, overwrite=overwrite)
        _write(files.certificate, _cert_pem(cert), mode=0o644, overwrite=overwrite)
    signing = generate_signing_key()
    _write(folder / SIGNING_KEY_FILE, _key_pem(signing), mode=0o600, overwrite=overwrite)
    _write(
        folder / PUBLIC_KEY_FILE, public_pem(signing.public_key()), mode=0o644, overwrite=overwrite
    )
    return DeploymentCertificates(
        ca=ca,
        server=server,
        signing_key=folder / SIGNING_KEY_FILE,
        signing_public_key=folder / PUBLIC_KEY_FILE,
    )


def issue_client_certificate(
    ca_dir: str | Path,
    client_id: str,
    out_dir: str | Path,
    *,
    days: int = 397,
    overwrite: bool = False,
) -> CertificateFiles:
    """Sign a mutual-TLS certificate for ``client_id`` with the CA in ``ca_dir``.

    Writes ``client.pem``, ``client.key`` and a copy of the CA's ``ca.pem``
    (what the client pins) into ``out_dir``. The client id is the
    certificate's common name and a ``urn:shoal:client:`` URI in its SAN.
    """
    check_client_id(client_id, error=SecurityError)
    if len(client_id) > _MAX_COMMON_NAME:
        raise SecurityError(
            f"a certificate's client id has at most {_MAX_COMMON_NAME} characters (X.509), "
            f"got {len(client_id)}"
        )
    ca_folder, folder = Path(ca_dir), Path(out_dir)
    ca_cert = _load_certificates(ca_folder / CA_CERTIFICATE)[0]
    ca_key = _load_ca_key(ca_folder / CA_KEY)
    client_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)])
    uri = x509.UniformResourceIdentifier(f"urn:shoal:client:{quote(client_id, safe='')}")
    client_cert = (
        _leaf_builder(name, ca_cert, ca_key, client_key.public_key(), days=days)
        .add_extension(x509.SubjectAlternativeName([uri]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    writable_folder(folder, what="certificate folder")
    files = CertificateFiles(folder / CLIENT_CERTIFICATE, folder / CLIENT_KEY)
    _write(files.private_key, _key_pem(client_key), mode=0o600, overwrite=overwrite)
    _write(files.certificate, _cert_pem(client_cert), mode=0o644, overwrite=overwrite)
    if (ca_folder / CA_CERTIFICATE).resolve() != (folder / CA_CERTIFICATE).resolve():
        shutil.copyfile(ca_folder / CA_CERTIFICATE, folder / CA_CERTIFICATE)
    return files


def load_server_credentials(
    server: CertificateFiles, *, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    """gRPC credentials for the coordinator; with ``client_ca``, mutual TLS is required.

    A client must then present a certificate signed by ``client_ca``.
    Raises ``SecurityError`` if a file is not valid PEM, the key does not
    match the certificate, or the certificate is expired.
    """
    certificate_pem, key_pem = _checked_pair(server)
    root_pem = None if client_ca is None else _checked_certificates(Path(client_ca))
    return grpc.ssl_server_credentials(
        [(key_pem, certificate_pem)],
        root_certificates=root_pem,
        require_client_auth=root_pem is not None,
    )


def load_channel_credentials(
    ca_pem: str | Path | bytes, client_cert: CertificateFiles | None = None
) -> grpc.ChannelCredentials:
    """gRPC credentials for a client that trusts only ``ca_pem`` (a path or the PEM bytes).

    ``ca_pem`` is the deployment CA, or the coordinator's own certificate
    to pin that one certificate; the system's trusted roots are never used.
    ``client_cert`` adds the client's certificate for mutual TLS.
    """
    if isinstance(ca_pem, bytes):
        _parse_certificates(ca_pem, "the pinned CA")
        root_pem = ca_pem
    else:
        root_pem = _checked_certificates(Path(ca_pem))
    if client_cert is None:
        return grpc.ssl_channel_credentials(root_certificates=root_pem)
    certificate_pem, key_pem = _checked_pair(client_cert)
    return grpc.ssl_channel_credentials(
        root_certificates=root_pem, private_key=key_pem, certificate_chain=certificate_pem
    )


@dataclass(frozen=True, slots=True)
class TlsPeer:
    """What the TLS handshake established about the other end of a gRPC call."""

    tls_version: str | None
    key_exchange_group: str | None
    common_name: str | None  # of the client certificate under mutual TLS: the client id


def tls_peer(auth_context: Mapping[str, Iterable[bytes]] | Mapping[str, bytes]) -> TlsPeer:
    """Read a servicer context's ``auth_context()``: TLS version, key exchange, client name.

    >>> tls_peer(context.auth_context()).tls_version  # doctest: +SKIP
    'TLSv1.3'
    """

    def first(key: str) -> str | None:
        values = auth_context.get(key)
        if values is None:
            return None
        value = values if isinstance(values, bytes) else next(iter(values), None)
        return None if value is None else value.decode(errors="replace")

    return TlsPeer(
        tls_version=first("ssl_tls_version"),
        key_exchange_group=first("ssl_negotiated_key_exchange_group"),
        common_name=first("x509_common_name"),
    )


# --- building ---------------------------------------------------------------------------


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, *, days: int
) -> x509.CertificateBuilder:
    if not 1 <= days <= MAX_CERTIFICATE_DAYS:
        raise SecurityError(
            f"a certificate is valid for 1 to {MAX_CERTIFICATE_DAYS} days, got {days}"
        )
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _leaf_builder(
    subject: x509.Name,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    *,
    days: int,
) -> x509.CertificateBuilder:
    issuer_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        _builder(subject, ca_cert.subject, public_key, days=days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(certificate_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(issuer_key_id, False)
    )


def _key_usage(*, certificate_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certificate_sign,
        crl_sign=certificate_sign,
        encipher_only=False,
        decipher_only=False,
    )


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _general_name(host: str) -> x509.GeneralName:
    """``host`` as a subjectAltName: an IP address, else a DNS name (a non-ASCII one in its
    IDNA form); :class:`ConfigError` for anything a TLS client could never match."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        ascii_name = host.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""
    labels = ascii_name.removeprefix("*.").split(".")
    if len(ascii_name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            f"not a host name or IP address: {host!r} (a host name is dot-separated labels of "
            "letters, digits and '-', none starting or ending with '-')"
        )
    return x509.DNSName(ascii_name)


# --- files -------------------------------------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write a new file created with ``mode`` (a key is never readable by others, even briefly)."""
    if path.exists():
        if not overwrite:
            raise SecurityError(f"{path} exists: refusing to overwrite it (pass overwrite=True)")
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _parse_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise SecurityError(f"{where} is not a PEM certificate: {exc}") from exc
    now = dt.datetime.now(dt.UTC)
    for cert in certificates:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SecurityError(
                f"{where}: certificate {cert.subject.rfc4514_string()} is valid only from "
                f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}"
            )
    return certificates


def _load_certificates(path: Path) -> list[x509.Certificate]:
    return _parse_certificates(_read(path, "certificate"), str(path))


def _checked_certificates(path: Path) -> bytes:
    data = _read(path, "certificate")
    _parse_certificates(data, str(path))
    return data


def _parse_private_key(data: bytes, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"{path} is not an unencrypted PEM private key: {exc}") from exc


def _load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = _parse_private_key(_read(path, "private key"), path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecurityError(f"{path} holds a {type(key).__name__}, expected an ECDSA CA key")
    return key


def _checked_pair(files: CertificateFiles) -> tuple[bytes, bytes]:
    """The PEM bytes of a certificate and its key, once they are known to belong together."""
    certificate_pem = _read(files.certificate, "certificate")
    leaf = _parse_certificates(certificate_pem, str(files.certificate))[0]
    key_pem = _read(files.private_key, "private key")
    key = _parse_private_key(key_pem, files.private_key)
    if key.public_key() != leaf.public_key():
        raise SecurityError(f"{files.private_key} is not the key of {files.certificate}")
    return certificate_pem, key_pem
