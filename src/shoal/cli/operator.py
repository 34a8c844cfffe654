"""``shoal models``, ``shoal clients``, ``shoal certs``: an operator's commands on a deployment.

They read and change the registries a coordinator uses, found the same way
it finds them (:func:`~shoal.registry.registry_location`): ``--registry
URL``, else the SQLite file in ``--state-dir``. Every command prints a rich
table, or with ``--json`` one JSON array or object and nothing else on
stdout. A mistake (an unknown id, a BAD rollback target) is one red line on
stderr and exit 1; a bad option value exits 2.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shoal.cli.app import app, user_errors
from shoal.core.errors import NotFoundError, RegistryError, SecurityError
from shoal.registry import (
    BlobStore,
    ClientRecord,
    ClientRegistry,
    ClientStatus,
    Database,
    EnrollmentTokens,
    ModelRecord,
    ModelRegistry,
    ModelStatus,
    blob_location,
    registry_location,
    token_id_of,
)
from shoal.registry.location import DEFAULT_STATE_DIR
from shoal.transport import certs

models_app = typer.Typer(
    help="Model versions: list, inspect, roll HEAD back.", no_args_is_help=True
)
clients_app = typer.Typer(
    help="Enrolled clients: list, inspect, suspend, resume, enroll.", no_args_is_help=True
)
certs_app = typer.Typer(help="TLS certificates for a deployment.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(clients_app, name="clients")
app.add_typer(certs_app, name="certs")

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="SHOAL_STATE_DIR",
        help="The coordinator's state folder: its SQLite registry and model blobs.",
    ),
]
RegistryUrl = Annotated[
    str | None,
    typer.Option(
        "--registry",
        metavar="URL",
        envvar="SHOAL_REGISTRY_URL",
        show_default="the SQLite file in --state-dir",
        help="Registry database URL (sqlite:///PATH or postgresql://...).",
    ),
]
BlobUrl = Annotated[
    str | None,
    typer.Option(
        "--blobs",
        metavar="URL",
        envvar="SHOAL_BLOB_URL",
        show_default="--state-dir/blobs",
        help="Model blob store: a folder or an fsspec URL.",
    ),
]
AsJson = Annotated[
    bool, typer.Option("--json", help="Print JSON (an array or an object) instead of a table.")
]

_STATUS_STYLE = {
    ModelStatus.GOOD: "green",
    ModelStatus.BAD: "red",
    ModelStatus.CANDIDATE: "yellow",
    ClientStatus.ACTIVE: "green",
    ClientStatus.SUSPENDED: "yellow",
    ClientStatus.RETIRED: "dim",
}
_FIRST_METRICS = ("accuracy", "loss")
_SHOWN_METRICS = 3

# --- shared helpers ----------------------------------------------------------------------


@contextmanager
def _database(state_dir: Path, url: str | None, *, must_exist: bool = True) -> Iterator[Database]:
    database = registry_location(state_dir, url).open(must_exist=must_exist)
    try:
        yield database
    finally:
        database.close()


def _console() -> Console:
    # made per command, so that it measures the terminal (or $COLUMNS) it prints to
    return Console(highlight=False)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}"


def _status(status: ModelStatus | ClientStatus) -> Text:
    return Text(status.value, style=_STATUS_STYLE[status])


def _cells(*values: object) -> list[Text]:
    """Table cells that show values as they are: a client id is never read as rich markup."""
    return [
        value if isinstance(value, Text) else Text("-" if value is None else str(value))
        for value in values
    ]


def _key_value_table(title: str | None, rows: Mapping[str, object]) -> Table:
    table = Table(
        title=None if title is None else Text(title), show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows.items():
        table.add_row(*_cells(key, value))
    return table


def parse_duration(text: str | timedelta) -> timedelta:
    """A positive duration written as ``30m``, ``12h``, ``7d``, ``2w`` or ``1d12h``."""
    if isinstance(text, timedelta):
        return text
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"(\d+)([smhdw])", text.strip().lower())
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.strip().lower():
        raise typer.BadParameter(f"{text!r} is not a duration like 30m, 12h, 7d or 2w")
    try:
        duration = timedelta(seconds=sum(int(number) * units[unit] for number, unit in parts))
    except OverflowError:
        raise typer.BadParameter(f"{text!r} is too long") from None
    if duration <= timedelta(0):
        raise typer.BadParameter(f"{text!r} is not a positive duration")
    return duration


def _interactive() -> bool:
    return sys.stdin.isatty()


# --- models ------------------------------------------------------------------------------


def _model_json(record: ModelRecord, *, head: bool) -> dict[str, Any]:
    fields = dataclasses.asdict(record)
    return fields | {
        "status": record.status.value,
        "created_at": _iso(record.created_at),
        "metrics": dict(record.metrics),
        "head": head,
    }


def _short_metrics(metrics: Mapping[str, Any]) -> str:
    keys = [key for key in _FIRST_METRICS if key in metrics]
    keys += sorted(key for key in metrics if key not in _FIRST_METRICS)
    shown = []
    for key in keys[:_SHOWN_METRICS]:
        value = metrics[key]
        number = isinstance(value, float | int) and not isinstance(value, bool)
        shown.append(f"{key}={value:.4g}" if number else f"{key}={value}")
    return " ".join(shown)


@models_app.command("list")
@user_errors
def list_models(
    name: Annotated[str | None, typer.Option("--name", help="Only this model.")] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    as_json: AsJson = False,
) -> None:
    """Every version of every model (or of --name), oldest first, HEAD marked."""
    with _database(state_dir, registry) as database:
        models = ModelRegistry(database, BlobStore(blob_location(state_dir, blobs)))
        rows: list[tuple[ModelRecord, bool]] = []
        for model in [name] if name is not None else models.names():
            head = models.head(model)
            if head is None:
                raise NotFoundError(f"no model named {model!r} in the registry")
            rows += [(record, record.version == head.version) for record in models.list(model)]
    if as_json:
        _print_json([_model_json(record, head=is_head) for record, is_head in rows])
        return
    table = Table(title="model versions", title_justify="left")
    for column in ("", "name", "version", "round", "parent", "status", "sha256", "created (UTC)"):
        numeric = column in ("version", "round")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column != "name")
    table.add_column("metrics", overflow="fold")
    for record, is_head in rows:
        table.add_row(
            *_cells(
                Text("HEAD", style="bold") if is_head else "",
                record.name,
                str(record.version),
                str(record.round),
                "-" if record.parent is None else str(record.parent),
                _status(record.status),
                record.sha256[:12],
                _when(record.created_at),
                _short_metrics(record.metrics),
            )
        )
    _console().print(table if rows else "no model versions in the registry")


@models_app.command("show")
@user_errors
def show_model(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[int, typer.Argument(metavar="VERSION", min=0, help="Version number.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    as_json: AsJson = False,
) -> None:
    """Every field of one model version, its metrics included."""
    with _database(state_dir, registry) as database:
        models = ModelRegistry(database, BlobStore(blob_location(state_dir, blobs)))
        record = models.get(name, version)
        head = models.head(name)
    is_head = head is not None and head.version == record.version
    fields = _model_json(record, head=is_head)
    if as_json:
        _print_json(fields)
        return
    metrics = fields.pop("metrics")
    fields["status"] = _status(record.status)
    fields |= {f"metrics.{key}": value for key, value in sorted(metrics.items())}
    _console().print(_key_value_table(f"{name} version {version}", fields))


@models_app.command("rollback")
@user_errors
def rollback_model(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[
        int, typer.Argument(metavar="VERSION", min=0, help="The version HEAD moves to.")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    as_json: AsJson = False,
) -> None:
    """Move HEAD of NAME to VERSION: new rounds build on it; later versions stay, for audit.

    Refuses a version marked BAD and one whose stored blob is missing or corrupt.
    """
    with _database(state_dir, registry) as database:
        models = ModelRegistry(database, BlobStore(blob_location(state_dir, blobs)))
        target = models.get(name, version)
        if target.status is ModelStatus.BAD:
            raise RegistryError(
                f"version {version} of {name} is marked BAD: not rolling back to it"
            )
        head = models.head(name)
        previous = None if head is None else head.version
        if previous != version and not yes:
            _confirm(f"Move HEAD of {name} from version {previous} to version {version}?")
        record = models.rollback(name, version)  # verifies the blob against its sha256
    if as_json:
        _print_json(_model_json(record, head=True) | {"previous_head": previous})
    elif previous == version:
        _console().print(f"HEAD of {name} is already version {version}", markup=False)
    else:
        _console().print(f"HEAD of {name}: version {previous} -> version {version}", markup=False)


def _confirm(question: str) -> None:
    if not _interactive():
        raise typer.BadParameter("no terminal to confirm the rollback on", param_hint="--yes")
    typer.confirm(question, default=False, abort=True, err=True)


# --- clients -----------------------------------------------------------------------------


def _client_json(record: ClientRecord) -> dict[str, Any]:
    return {
        "client_id": record.client_id,
        "status": record.status.value,
        "status_reason": record.status_reason,
        **dataclasses.asdict(record.device),
        "can_train": record.eligibility.can_train,
        "rejection_reason": record.eligibility.reason,
        "public_key": None if record.public_key is None else record.public_key.hex(),
        "enrolled_at": _iso(record.enrolled_at),
        "last_seen": _iso(record.last_seen),
        "expires_at": _iso(record.expires_at),
    }


def _eligibility(record: ClientRecord) -> str:
    return "yes" if record.eligibility.can_train else f"no: {record.eligibility.reason}"


@clients_app.command("list")
@user_errors
def list_clients(
    status: Annotated[
        ClientStatus | None, typer.Option("--status", case_sensitive=False, help="Only these.")
    ] = None,
    device_class: Annotated[
        str | None, typer.Option("--device-class", help="Only this device class.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Enrolled clients, by id."""
    with _database(state_dir, registry) as database:
        records = ClientRegistry(database).list(
            status=status, device_class=device_class, limit=limit
        )
    if as_json:
        _print_json([_client_json(record) for record in records])
        return
    if not records:
        _console().print("no clients match")
        return
    table = Table(title=f"clients (first {limit} by id)", title_justify="left")
    for column in ("client", "status", "class", "battery", "charging", "wifi", "RAM GB"):
        table.add_column(column)
    for column in ("app", "runtime", "arch", "last seen (UTC)", "can train"):
        table.add_column(column)
    for record in records:
        device = record.device
        table.add_row(
            *_cells(
                record.client_id,
                _status(record.status),
                device.device_class,
                f"{device.battery_level:.0%}",
                "yes" if device.charging else "no",
                "yes" if device.wifi else "no",
                f"{device.ram_gb:g}",
                device.app_version,
                device.runtime_version,
                device.model_architecture_version,
                _when(record.last_seen),
                _eligibility(record),
            )
        )
    _console().print(table)


@clients_app.command("show")
@user_errors
def show_client(
    client_id: Annotated[str, typer.Argument(metavar="ID", help="Client id.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Every field of one client."""
    with _database(state_dir, registry) as database:
        record = ClientRegistry(database).get(client_id)
    _print_client(record, as_json=as_json)


def _print_client(record: ClientRecord, *, as_json: bool) -> None:
    fields = _client_json(record)
    if as_json:
        _print_json(fields)
        return
    fields["status"] = _status(record.status)
    _console().print(_key_value_table(f"client {record.client_id}", fields))


@clients_app.command("suspend")
@user_errors
def suspend_client(
    client_id: Annotated[str, typer.Argument(metavar="ID", help="Client id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept with the client).")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Stop selecting a client until it is resumed."""
    if not reason.strip():
        raise typer.BadParameter("give a reason", param_hint="--reason")
    with _database(state_dir, registry) as database:
        record = ClientRegistry(database).set_status(client_id, ClientStatus.SUSPENDED, reason)
    _print_client(record, as_json=as_json)


@clients_app.command("resume")
@user_errors
def resume_client(
    client_id: Annotated[str, typer.Argument(metavar="ID", help="Client id.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Make a suspended client selectable again (a retired one stays retired)."""
    with _database(state_dir, registry) as database:
        record = ClientRegistry(database).set_status(client_id, ClientStatus.ACTIVE)
    _print_client(record, as_json=as_json)


@clients_app.command("enroll")
@user_errors
def enroll_client(
    client_id: Annotated[
        str | None, typer.Option("--id", help="Bind the token to this client id.")
    ] = None,
    expires_in: Annotated[
        timedelta,
        typer.Option(
            "--expires-in",
            parser=parse_duration,
            metavar="DURATION",
            show_default="7d",
            help="Lifetime of the token: 30m, 12h, 7d, 2w...",
        ),
    ] = timedelta(days=7),
    uses: Annotated[int, typer.Option("--uses", min=1, help="Enrollments it allows.")] = 1,
    mtls: Annotated[
        bool, typer.Option("--mtls", help="Also issue a client certificate (needs --id).")
    ] = False,
    ca_dir: Annotated[
        Path | None, typer.Option("--ca-dir", help="Folder of ca.pem and ca.key (--mtls).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the client's certificate (--mtls).")
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Issue an enrollment token (shown once) and, with --mtls, a client certificate."""
    if mtls and (client_id is None or ca_dir is None or out is None):
        raise typer.BadParameter("needs --id, --ca-dir and --out", param_hint="--mtls")
    if not mtls and (ca_dir is not None or out is not None):
        raise typer.BadParameter("only with --mtls", param_hint="--ca-dir/--out")
    certificate = None
    if mtls:
        assert client_id is not None and ca_dir is not None and out is not None
        certificate = certs.issue_client_certificate(ca_dir, client_id, out)
    location = registry_location(state_dir, registry)
    with _database(state_dir, registry, must_exist=False) as database:
        tokens = EnrollmentTokens(database)
        token = tokens.issue(client_id=client_id, expires_in=expires_in, uses=uses)
        record = tokens.get(token_id_of(token))
    issued: dict[str, Any] = {
        "token": token,
        "token_id": record.token_id,
        "client_id": client_id,
        "uses": uses,
        "expires_at": _iso(record.expires_at),
        "registry": str(location),
        "certificate": None,
    }
    if certificate is not None:
        issued["certificate"] = {
            "certificate": str(certificate.certificate),
            "private_key": str(certificate.private_key),
            "ca": str(certificate.certificate.parent / certs.CA_CERTIFICATE),
        }
    if as_json:
        _print_json(issued)
        return
    console = _console()
    console.print("[bold]enrollment token[/] (shown only now; hand it to the client secretly):")
    console.print(token, markup=False, soft_wrap=True)
    details = {
        "token id": record.token_id,
        "client id": client_id or "any",
        "uses": uses,
        "expires (UTC)": _when(record.expires_at),
        "registry": location,
    }
    if certificate is not None:
        details |= {f"mTLS {key}": value for key, value in issued["certificate"].items()}
    console.print(_key_value_table(None, details))


# --- certificates ------------------------------------------------------------------------


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
        int, typer.Option("--days", min=1, help="Validity of the server certificate.")
    ] = 397,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
    as_json: AsJson = False,
) -> None:
    """Make a deployment CA and the coordinator's certificate; print the CA's fingerprint."""
    names = (certs.CA_CERTIFICATE, certs.CA_KEY, certs.SERVER_CERTIFICATE, certs.SERVER_KEY)
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
            f"clients pin {written.ca.certificate}; keep {written.ca.private_key} "
            "off the coordinator",
            style="dim",
        )
    )
