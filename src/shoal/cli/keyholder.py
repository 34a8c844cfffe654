"""``shoal keyholder init`` and ``serve``: the key holder of a consortium, not the coordinator."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.text import Text

from shoal.cli.app import app, user_errors
from shoal.cli.operator import AsJson, _console, _key_value_table, _print_json
from shoal.config import MAX_CLIENTS
from shoal.core.errors import ConfigError
from shoal.core.identifiers import check_client_id
from shoal.core.serving import raise_open_files_limit
from shoal.secure.keyholder import read_silo_keys

keyholder_app = typer.Typer(
    help="The key holder of homomorphic aggregation: the only party with the secret key.",
    no_args_is_help=True,
)
app.add_typer(keyholder_app, name="keyholder")


def parse_silos(pairs: list[str], silos_file: Path | None) -> dict[str, bytes]:
    """Silo ids and Ed25519 public keys from ``NAME=HEX`` pairs and a JSON object file."""
    entries: list[tuple[str, bytes, str]] = []
    for pair in pairs:
        name, sep, key = pair.partition("=")
        if not sep:
            raise ConfigError(f"--silo: expected NAME=HEX_PUBLIC_KEY, got {pair!r}")
        try:
            entries.append((name.strip(), bytes.fromhex(key.strip()), "--silo"))
        except ValueError:
            raise ConfigError(f"--silo: the key of silo {name.strip()!r} is not hex") from None
    if silos_file is not None:
        try:
            listed = read_silo_keys(silos_file)
        except ConfigError as exc:
            raise ConfigError(f"--silos-file: {exc}") from None
        entries.extend((name, keys.public, "--silos-file") for name, keys in listed.items())
    silos: dict[str, bytes] = {}
    for name, public, source in entries:
        check_client_id(name, error=ConfigError)  # a silo enrolls under its name
        if name in silos:
            raise ConfigError(f"{source}: silo {name!r} is given twice")
        silos[name] = public
    if not silos:
        raise ConfigError("--silo or --silos-file: a consortium needs its silos")
    return silos


def _bit_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--coeff-mod-bit-sizes: expected e.g. 60,40,40,60, got {text!r}"
        ) from None


@keyholder_app.command("init")
@user_errors
def init_command(
    directory: Annotated[Path, typer.Option("--dir", help="New folder for the keys.")],
    min_contributors: Annotated[
        int, typer.Option("--min-contributors", "-k", help="Distinct silos an aggregate needs.")
    ],
    silo: Annotated[
        list[str] | None,
        typer.Option("--silo", help="NAME=HEX Ed25519 public key of a silo; repeatable."),
    ] = None,
    silos_file: Annotated[
        Path | None, typer.Option("--silos-file", help="JSON object: silo id -> hex public key.")
    ] = None,
    degree: Annotated[int, typer.Option("--poly-modulus-degree", help="CKKS ring degree.")] = 8192,
    bit_sizes: Annotated[
        str, typer.Option("--coeff-mod-bit-sizes", help="The prime chain, comma separated.")
    ] = "60,40,40,60",
    scale_bits: Annotated[
        int, typer.Option("--scale-bits", help="log2 of the CKKS scale (precision).")
    ] = 40,
    noise_std: Annotated[
        float | None,
        typer.Option(
            "--decryption-noise-std",
            show_default="2^-16",
            help="Flooding noise added to every decrypted value.",
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Generate the consortium's CKKS keys; print the public context's sha256 for silos to pin."""
    from shoal.secure.ckks import CkksParameters
    from shoal.secure.keyholder import DEFAULT_DECRYPTION_NOISE_STD, PUBLIC_CONTEXT, KeyHolder

    silos = parse_silos(silo or [], silos_file)
    params = CkksParameters(
        poly_modulus_degree=degree,
        coeff_mod_bit_sizes=_bit_sizes(bit_sizes),
        global_scale_bits=scale_bits,
    )
    holder = KeyHolder.init(
        directory,
        params=params,
        min_contributors=min_contributors,
        silos=silos,
        decryption_noise_std=DEFAULT_DECRYPTION_NOISE_STD if noise_std is None else noise_std,
    )
    summary = {
        "directory": str(directory),
        "public_context": str(directory / PUBLIC_CONTEXT),
        "public_context_sha256": holder.public_context_sha256(),
        "silos": len(silos),
        "min_contributors": min_contributors,
    }
    if as_json:
        _print_json(summary)
        return
    console = _console()
    console.print(_key_value_table("key holder", summary))
    console.print(
        Text("silos compare public_context_sha256 with the context they are given", style="dim")
    )


@keyholder_app.command("silo-keys")
@user_errors
def silo_keys_command(
    out: Annotated[Path, typer.Option("--out", help="New JSON file of the silos' key pairs.")],
    silo: Annotated[
        list[str] | None, typer.Option("--silo", help="A silo's id; repeatable.")
    ] = None,
    simulated: Annotated[
        int,
        typer.Option(
            "--simulated", min=0, max=MAX_CLIENTS, help="Add the first N simulated clients' ids."
        ),
    ] = 0,
) -> None:
    """Make Ed25519 receipt keys for silos (mode 0600); init --silos-file reads the public halves.

    In a real consortium each silo makes its own and sends only the public
    key; this file stands for all of them in a simulation or a rehearsal.
    """
    from shoal.simulation.consortium import create_silo_keys
    from shoal.simulation.population import client_name

    names = [*(silo or []), *(client_name(index) for index in range(simulated))]
    for index, name in enumerate(names):
        check_client_id(name, error=ConfigError)  # a silo enrolls under its name
        if name in names[:index]:  # one key file entry per silo: a second would replace it
            raise ConfigError(f"--silo: silo {name!r} is given twice")
    if not names:
        raise ConfigError("--silo or --simulated: name at least one silo")
    if out.exists():
        raise ConfigError(f"--out: {out} exists; refusing to overwrite keys")
    create_silo_keys(out, names)
    typer.echo(f"wrote the key pairs of {len(names)} silos to {out}")


@keyholder_app.command("serve")
@user_errors
def serve_command(
    directory: Annotated[Path, typer.Option("--dir", help="The folder made by init.")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to listen on.")] = (
        "127.0.0.1:50061"
    ),
    certificates: Annotated[
        Path | None,
        typer.Option("--certificates", help="Folder with server.pem and server.key (and ca.pem)."),
    ] = None,
    mutual_tls: Annotated[
        bool, typer.Option("--mutual-tls", help="Require client certificates from ca.pem.")
    ] = False,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Serve without TLS (refused unless given).")
    ] = False,
    max_message_mb: Annotated[
        int, typer.Option("--max-message-mb", min=1, max=2047, help="Largest request accepted.")
    ] = 512,
) -> None:
    """Serve decryptions until SIGTERM or SIGINT (calls in flight finish first)."""
    from shoal.transport.certs import (
        CA_CERTIFICATE,
        SERVER_CERTIFICATE,
        SERVER_KEY,
        CertificateFiles,
    )
    from shoal.transport.keyholder_service import serve_keyholder

    if (certificates is None) != insecure:
        raise ConfigError("--certificates: the key holder serves with TLS; or pass --insecure")
    if mutual_tls and certificates is None:
        raise ConfigError("--mutual-tls needs --certificates")
    server_files = (
        None
        if certificates is None
        else CertificateFiles(certificates / SERVER_CERTIFICATE, certificates / SERVER_KEY)
    )
    client_ca = certificates / CA_CERTIFICATE if mutual_tls and certificates else None
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    raise_open_files_limit()  # each connection is a file descriptor
    try:
        server = serve_keyholder(
            directory,
            address=listen,
            server_certificate=server_files,
            client_ca=client_ca,
            insecure=insecure,
            max_message_bytes=max_message_mb * 2**20,
        )
        typer.echo(f"key holder listening on {server.address} (port {server.port})")
        stopping.wait()
        server.stop(grace_s=5.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    typer.echo("key holder stopped")
