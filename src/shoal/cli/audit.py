"""``shoal audit show|verify``: the registry's tamper-evident audit log, listed and checked.

Both find the registry as the other operator commands do (``--state-dir``,
``--registry``; a ``shoal simulate`` run folder is ``--state-dir RUN``).
``verify`` checks every entry's hash, the sequence, the links and every
signed head against the coordinator's public key (``--public-key``, else
``model-signing.pub`` in the state folder, as ``shoal models verify``): exit
0 and one line when the log is intact, exit 1 and one line naming the first
bad entry when it is not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shoal.cli.app import app, user_errors
from shoal.cli.operator import (
    MAX_REGISTRY_INT,
    AsJson,
    RegistryUrl,
    StateDir,
    _cells,
    _console,
    _database,
    _print_json,
)
from shoal.governance.model_signing import PUBLIC_KEY_FILE, load_public_key
from shoal.registry import AuditEntry, AuditLog, verify_audit_log
from shoal.registry.location import DEFAULT_STATE_DIR

audit_app = typer.Typer(
    help="The tamper-evident audit log: list its entries, verify its chain and signatures.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")

_DETAILS_SHOWN = 120


def _entry_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "recorded_at": entry.recorded_at,
        "time": entry.time.isoformat(),
        "kind": entry.kind,
        "actor": entry.actor,
        "subject": entry.subject,
        "details": dict(entry.details),
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }


def _short(details: Any) -> str:
    text = json.dumps(details, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= _DETAILS_SHOWN else text[: _DETAILS_SHOWN - 3] + "..."


@audit_app.command("show")
@user_errors
def show_audit(
    kind: Annotated[
        str | None, typer.Option("--kind", help="Only entries of this kind (commit, mark...).")
    ] = None,
    since_seq: Annotated[
        int,
        typer.Option("--since-seq", min=0, max=MAX_REGISTRY_INT, help="Entries after this seq."),
    ] = 0,
    limit: Annotated[
        int, typer.Option("--limit", min=0, max=MAX_REGISTRY_INT, help="At most this many.")
    ] = 100,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """List the audit log's entries, oldest first."""
    with _database(state_dir, registry, read_only=True) as database:
        entries = AuditLog(database).entries(kind=kind, since_seq=since_seq, limit=limit)
    if as_json:
        _print_json([_entry_json(entry) for entry in entries])
        return
    table = Table(title=f"audit log ({len(entries)} entries)", title_justify="left")
    for column in ("seq", "time (UTC)", "kind", "actor", "subject", "details", "hash"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        when = f"{entry.time:%Y-%m-%d %H:%M:%S}"
        details = _short(entry.details)
        table.add_row(
            *_cells(
                entry.seq, when, entry.kind, entry.actor, entry.subject, details, entry.hash[:12]
            )
        )
    _console().print(table)


@audit_app.command("verify")
@user_errors
def verify_audit(
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            metavar="FILE",
            show_default="--state-dir/model-signing.pub",
            help="The coordinator's public key (PEM) the heads are checked against.",
        ),
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Check every entry's hash, the sequence, the links and the signed heads.

    Exits 0 with one line when the log is intact; 1 with one line naming the
    first bad entry (edited, deleted, inserted, reordered, rewritten, or a
    bad signature) when it is not. Entries after the last signed head are
    covered by no signature: the line says how many.
    """
    with _database(state_dir, registry, read_only=True) as database:
        # the registry first: a folder without one is no state folder, whatever key it lacks
        pinned = load_public_key(public_key or state_dir / PUBLIC_KEY_FILE)
        report = verify_audit_log(database, pinned.verify_audit_head)
    if as_json:
        problem = report.problem
        _print_json(
            {
                "intact": report.intact,
                "entries": report.entries,
                "signed_seq": report.signed_seq,
                "uncovered": report.uncovered,
                "problem": None
                if problem is None
                else {"seq": problem.seq, "kind": problem.kind, "detail": problem.detail},
                "key_id": pinned.key_id,
            }
        )
    elif report.intact:
        _console().print(report.line(), markup=False)
    else:
        _console().print(report.line(), markup=False, style="red")
    if not report.intact:
        raise typer.Exit(1)
