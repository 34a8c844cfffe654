"""``shoal clients list|show|suspend|resume|enroll``: the client registry and enrollment."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shoal.cli.app import app, user_errors
from shoal.cli.operator import (
    MAX_REGISTRY_INT,
    Actor,
    AsJson,
    RegistryUrl,
    StateDir,
    _audit,
    _cells,
    _console,
    _database,
    _iso,
    _key_value_table,
    _print_json,
    _status,
    _when,
    parse_client_id,
    parse_duration,
)
from shoal.core.device import DeviceState
from shoal.registry import (
    ClientRecord,
    ClientRegistry,
    ClientStatus,
    EnrollmentTokens,
    registry_location,
    token_id_of,
)
from shoal.registry.location import DEFAULT_STATE_DIR
from shoal.transport import certs

clients_app = typer.Typer(
    help="Enrolled clients: list, inspect, suspend, resume, enroll.", no_args_is_help=True
)
app.add_typer(clients_app, name="clients")


ClientId = Annotated[str, typer.Argument(metavar="ID", parser=parse_client_id, help="Client id.")]
UNKNOWN = "unknown"  # a fact the client did not report (null in JSON)


def _client_json(record: ClientRecord) -> dict[str, Any]:
    eligibility = record.current_eligibility()  # never "yes" for a suspended or retired client
    return {
        "client_id": record.client_id,
        "status": record.status.value,
        "status_reason": record.status_reason,
        **dataclasses.asdict(record.device),
        "can_train": eligibility.can_train,
        "rejection_reason": eligibility.reason,
        "public_key": None if record.public_key is None else record.public_key.hex(),
        "enrolled_at": _iso(record.enrolled_at),
        "last_seen": _iso(record.last_seen),
        "expires_at": _iso(record.expires_at),
    }


def _eligibility(record: ClientRecord) -> str:
    eligibility = record.current_eligibility()
    return "yes" if eligibility.can_train else f"no: {eligibility.reason}"


def _facts(device: DeviceState) -> dict[str, str]:
    """Battery, charging, WiFi, idleness and RAM as a person reads them; "unknown" where not
    reported."""

    def flag(value: bool | None) -> str:
        return UNKNOWN if value is None else "yes" if value else "no"

    battery, ram = device.battery_level, device.ram_gb
    return {
        "battery_level": UNKNOWN if battery is None else f"{battery:.0%}",
        "charging": flag(device.charging),
        "wifi": flag(device.wifi),
        "idle": flag(device.idle),
        "ram_gb": UNKNOWN if ram is None else f"{ram:g}",
    }


@clients_app.command("list")
@user_errors
def list_clients(
    status: Annotated[
        ClientStatus | None, typer.Option("--status", case_sensitive=False, help="Only these.")
    ] = None,
    device_class: Annotated[
        str | None, typer.Option("--device-class", help="Only this device class.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=MAX_REGISTRY_INT, help="At most this many.")
    ] = 100,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Enrolled clients, by id."""
    with _database(state_dir, registry, read_only=True) as database:
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
    for column in ("client", "status", "class", "battery", "charging", "wifi", "idle", "RAM GB"):
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
                *_facts(device).values(),
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
    client_id: ClientId,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Every field of one client."""
    with _database(state_dir, registry, read_only=True) as database:
        record = ClientRegistry(database).get(client_id)
    _print_client(record, as_json=as_json)


def _print_client(record: ClientRecord, *, as_json: bool) -> None:
    fields = _client_json(record)
    if as_json:
        _print_json(fields)
        return
    fields |= _facts(record.device)
    fields["status"] = _status(record.status)
    _console().print(_key_value_table(f"client {record.client_id}", fields))


@clients_app.command("suspend")
@user_errors
def suspend_client(
    client_id: ClientId,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept with the client).")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Stop selecting a client until it is resumed."""
    if not reason.strip():
        raise typer.BadParameter("give a reason", param_hint="--reason")
    with _database(state_dir, registry) as database:
        clients = ClientRegistry(database, audit=_audit(database, actor))
        record = clients.set_status(client_id, ClientStatus.SUSPENDED, reason)
    _print_client(record, as_json=as_json)


@clients_app.command("resume")
@user_errors
def resume_client(
    client_id: ClientId,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Make a suspended client selectable again (a retired one stays retired)."""
    with _database(state_dir, registry) as database:
        clients = ClientRegistry(database, audit=_audit(database, actor))
        record = clients.set_status(client_id, ClientStatus.ACTIVE)
    _print_client(record, as_json=as_json)


@clients_app.command("enroll")
@user_errors
def enroll_client(
    client_id: Annotated[
        str | None,
        typer.Option("--id", parser=parse_client_id, help="Bind the token to this client id."),
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
    uses: Annotated[
        int, typer.Option("--uses", min=1, max=MAX_REGISTRY_INT, help="Enrollments it allows.")
    ] = 1,
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
    actor: Actor = None,
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
        granted = {"client_id": client_id, "uses": uses, "expires_at": _iso(record.expires_at)}
        _audit(database, actor).append("token_issue", subject=record.token_id, details=granted)
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
