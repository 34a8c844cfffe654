"""``shoal certs init``: the CA and coordinator certificate of a deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from rich.text import Text

from shoal.cli.app import app, user_errors
from shoal.cli.operator import (
    AsJson,
    _console,
    _key_value_table,
    _print_json,
)
from shoal.core.errors import SecurityError
from shoal.governance.model_signing import PUBLIC_KEY_FILE, SIGNING_KEY_FILE
from shoal.transport import certs

certs_app = typer.Typer(help="TLS certificates for a deployment.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")


def certificate_fingerprint(path: Path) -> str:
    """The SHA-256 fingerprint of a PEM certificate, as lowercase hex (what clients pin)."""
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read the certificate {path}: {exc}") from exc
    return certificate.fingerprint(hashes.SHA256()).hex()


@certs_app.command("init")
@user_errors
def init_certs(
    out: Annotated[Path, typer.Option("--out", help="Folder for the CA and server files.")],
    hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            show_default="localhost, 127.0.0.1",
            help="Name or address the coordinator is reached at; repeatable.",
        ),
    ] = None,
    days: Annotated[
        int,
        typer.Option(
            "--days",
            min=1,
            max=certs.MAX_CERTIFICATE_DAYS,
            help="Validity of the server certificate.",
        ),
    ] = 397,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
    as_json: AsJson = False,
) -> None:
    """Make a deployment CA, the coordinator's certificate and model-signing key.

    Prints the CA's fingerprint; clients pin ca.pem and model-signing.pub.
    """
    names = (
        certs.CA_CERTIFICATE,
        certs.CA_KEY,
        certs.SERVER_CERTIFICATE,
        certs.SERVER_KEY,
        SIGNING_KEY_FILE,
        PUBLIC_KEY_FILE,
    )
    existing = [name for name in names if (out / name).exists()]
    if existing and not force:
        raise SecurityError(
            f"{out} already holds {', '.join(existing)}: refusing to overwrite (pass --force)"
        )
    chosen = hosts or ["localhost", "127.0.0.1"]
    written = certs.init_certificates(out, hosts=chosen, days=days, overwrite=force)
    files = {
        "ca_certificate": str(written.ca.certificate),
        "ca_key": str(written.ca.private_key),
        "server_certificate": str(written.server.certificate),
        "server_key": str(written.server.private_key),
        "model_signing_key": str(written.signing_key),
        "model_signing_public_key": str(written.signing_public_key),
    }
    fingerprint = certificate_fingerprint(written.ca.certificate)
    if as_json:
        _print_json(files | {"hosts": chosen, "days": days, "ca_sha256": fingerprint})
        return
    console = _console()
    console.print(_key_value_table("certificates", files | {"hosts": ", ".join(chosen)}))
    pairs = ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2)).upper()
    console.print(f"CA fingerprint (SHA-256): {pairs}", soft_wrap=True)
    console.print(
        Text(
            f"clients pin {written.ca.certificate} and {written.signing_public_key}; "
            f"keep {written.ca.private_key} off the coordinator",
            style="dim",
        )
    )
