"""``shoal attest keygen|manifest|allow|list|revoke``: release manifests and the allow-list.

The release side: ``keygen`` makes an Ed25519 release key pair (PEM), and
``manifest`` measures the Shoal package and a client app installed here and
signs the result; the manifest ships with the client (``shoal client run
--manifest``). The operator's side: ``allow`` puts a build (a manifest, or a
plugged-in kind's build id) on the coordinator's allow-list, ``revoke``
takes it off for good, ``list`` shows both with who decided, when and why.
A coordinator with ``coordinator.attestation = "manifest"`` and the release
public key in ``coordinator.release_keys`` then admits exactly those builds.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shoal.cli.app import app, user_errors
from shoal.cli.operator import (
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
    _when,
)
from shoal.client.app import add_search_path, app_search_path, with_config_folder
from shoal.config import load_config
from shoal.core.errors import ConfigError
from shoal.governance import (
    MANIFEST_KIND,
    SignedManifest,
    generate_release_key,
    key_fingerprint,
    load_release_private_key,
    release_statement,
    sign_manifest,
)
from shoal.governance.attestation import check_kind
from shoal.registry import AllowedBuild, AllowedBuilds, BuildState
from shoal.registry.location import DEFAULT_STATE_DIR

attest_app = typer.Typer(
    help="Client attestation: release keys and manifests, and the allow-list of builds.",
    no_args_is_help=True,
)
app.add_typer(attest_app, name="attest")

Reason = Annotated[str, typer.Option("--reason", help="Why (kept with the decision).")]
By = Annotated[
    str | None,
    typer.Option(
        "--by",
        "--actor",
        help="Who decides (kept with the decision, and in the audit log).",
        show_default="your login",
    ),
]


def _who(by: str | None) -> str:
    if by is not None:
        return by
    try:
        return getpass.getuser()
    except (OSError, KeyError) as exc:
        raise typer.BadParameter("cannot tell your login: say who", param_hint="--by") from exc


def _reason(reason: str) -> str:
    if not reason.strip():
        raise typer.BadParameter("give a reason", param_hint="--reason")
    return reason


@attest_app.command("keygen")
@user_errors
def keygen(
    out: Annotated[
        Path, typer.Option("--out", help="Writes OUT.key (private, 0600) and OUT.pub (public).")
    ],
) -> None:
    """Make an Ed25519 release key pair: sign manifests with .key, trust .pub on coordinators."""
    private, public = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    raw = generate_release_key(private, public)
    console = _console()
    console.print(f"release key {key_fingerprint(raw)}", markup=False)
    console.print(
        f"  private: {private} (keep it offline; it signs what clients may run)", markup=False
    )
    console.print(f"  public:  {public} (list it in coordinator.release_keys)", markup=False)


@attest_app.command("manifest")
@user_errors
def manifest(
    release_key: Annotated[
        Path, typer.Option("--release-key", help="The release private key (PEM) that signs.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the signed manifest.")],
    app_spec: Annotated[
        str | None,
        typer.Option("--app", help="MODULE:FUNCTION of the client app (default: \\[app] client)."),
    ] = None,
    config_path: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="The job's TOML config (its \\[app] section)."),
    ] = None,
    label: Annotated[str, typer.Option("--label", help="A name for this release.")] = "",
    as_json: AsJson = False,
) -> None:
    """Measure the Shoal package and the client app installed here, and sign the result."""
    key = load_release_private_key(release_key)
    config = with_config_folder(load_config(config_path), config_path)
    spec = app_spec or config.app.client
    add_search_path(app_search_path(config))  # the app is found as `shoal client run` finds it
    signed = sign_manifest(release_statement(spec, label=label), key)
    out.write_text(signed.to_json())
    _print_manifest(signed, out, as_json=as_json)


def _print_manifest(signed: SignedManifest, out: Path, *, as_json: bool) -> None:
    statement = signed.statement
    fields: dict[str, Any] = {
        "manifest_id": signed.manifest_id,
        "app": statement.app,
        "label": statement.label,
        "shoal_version": statement.shoal_version,
        "release_key": signed.key_fingerprint,
        **{f"{name}_sha256": tree.sha256 for name, tree in sorted(statement.components.items())},
        **{f"{name}_files": tree.files for name, tree in sorted(statement.components.items())},
        "file": str(out),
    }
    if as_json:
        _print_json(fields)
        return
    _console().print(_key_value_table(f"manifest {signed.manifest_id[:16]}", fields))


def _entry_json(entry: AllowedBuild) -> dict[str, Any]:
    return {
        "build_id": entry.build_id,
        "kind": entry.kind,
        "label": entry.label,
        "state": entry.state.value,
        "allowed_by": entry.allowed_by,
        "allowed_at": _iso(entry.allowed_at),
        "allowed_reason": entry.allowed_reason,
        "revoked_by": entry.revoked_by,
        "revoked_at": _iso(entry.revoked_at),
        "revoked_reason": entry.revoked_reason,
    }


def _print_entry(entry: AllowedBuild, *, as_json: bool) -> None:
    if as_json:
        _print_json(_entry_json(entry))
        return
    _console().print(
        _key_value_table(f"{entry.kind} build {entry.build_id[:16]}", _entry_json(entry))
    )


@attest_app.command("allow")
@user_errors
def allow(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MANIFEST|BUILD_ID",
            help="A signed manifest file, or (with --kind) another kind's build id.",
        ),
    ],
    reason: Reason,
    kind: Annotated[
        str | None, typer.Option("--kind", help="The evidence kind of a BUILD_ID (not a manifest).")
    ] = None,
    by: By = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Admit clients that attest this build (at their next enrollment or check-in)."""
    reason, who = _reason(reason), _who(by)
    if kind is None or kind == MANIFEST_KIND:
        path = Path(target)
        if not path.is_file():
            raise ConfigError(
                f"{target} is not a manifest file: allow a manifest, or give --kind with a build id"
            )
        signed = SignedManifest.read(path)
        signed.verify()  # a corrupted or altered file is never allowed
        build_id, kind, label = signed.manifest_id, MANIFEST_KIND, signed.description
    else:
        build_id, label = target, ""
        check_kind(kind, error=ConfigError)
    with _database(state_dir, registry, must_exist=False) as database:
        entry = AllowedBuilds(database).allow(
            build_id=build_id, kind=kind, label=label, by=who, reason=reason
        )
        details = {"kind": kind, "label": label, "reason": reason}
        _audit(database, who).append("attest_allow", subject=build_id, details=details)
    _print_entry(entry, as_json=as_json)


@attest_app.command("list")
@user_errors
def list_builds(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Every build on the allow-list, revoked ones included, oldest first."""
    with _database(state_dir, registry) as database:
        entries = AllowedBuilds(database).list()
    if as_json:
        _print_json([_entry_json(entry) for entry in entries])
        return
    if not entries:
        _console().print("no build is allowed: attested clients are all refused")
        return
    table = Table(title="allowed builds", title_justify="left")
    for column in ("build", "kind", "state", "label", "allowed (UTC)", "by", "why"):
        table.add_column(column)
    table.add_column("revoked (UTC)")
    for entry in entries:
        revoked = entry.state is BuildState.REVOKED
        table.add_row(
            *_cells(
                entry.build_id[:16],
                entry.kind,
                entry.state.value,
                entry.label,
                _when(entry.allowed_at),
                entry.allowed_by,
                entry.allowed_reason,
                (
                    f"{_when(entry.revoked_at)} by {entry.revoked_by}: {entry.revoked_reason}"
                    if revoked
                    else None
                ),
            )
        )
    _console().print(table)


@attest_app.command("revoke")
@user_errors
def revoke(
    build_id: Annotated[
        str, typer.Argument(metavar="BUILD_ID", help="The build id, or its first 8+ characters.")
    ],
    reason: Reason,
    by: By = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Refuse clients of a build from their next check-in on; a revocation is final."""
    reason, who = _reason(reason), _who(by)
    with _database(state_dir, registry) as database:
        entry = AllowedBuilds(database).revoke(build_id, by=who, reason=reason)
        details = {"reason": reason}
        _audit(database, who).append("attest_revoke", subject=entry.build_id, details=details)
    _print_entry(entry, as_json=as_json)
