"""``shoal unlearn CLIENT``: forget a client, in a simulated run folder or a coordinator's state."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shoal.cli.app import app, user_errors
from shoal.cli.operator import AsJson, BlobUrl, RegistryUrl, _print_json
from shoal.core.errors import ConfigError
from shoal.governance.unlearning import UnlearningReport

console = Console(highlight=False)

_SHOWN = (
    "client_id",
    "actor",
    "participated_rounds",
    "first_participation",
    "first_asked",
    "restart_version",
    "restart_round",
    "superseded_versions",
    "recomputed_rounds",
    "old_head_version",
    "old_head_accuracy",
    "old_head_sha256",
    "new_head_version",
    "new_head_accuracy",
    "new_head_sha256",
)


@app.command("unlearn")
@user_errors
def unlearn_command(
    client_id: Annotated[str, typer.Argument(metavar="CLIENT", help="The client to forget.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="A simulated run folder: retrain it at once without the client."
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="A stopped coordinator's state folder: retire and roll back; the next "
            "`shoal coordinator serve` retrains.",
        ),
    ] = None,
    actor: Annotated[
        str | None,
        typer.Option("--actor", help="Who asks (recorded in the report and the registry)."),
    ] = None,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    as_json: AsJson = False,
) -> None:
    """Forget CLIENT: retire it, return to the last version before its first participation,
    and train the rounds from there again without it (the old versions stay, marked BAD).

    Writes the report to unlearning-CLIENT.json in the folder.
    """
    from shoal.simulation.unlearning import default_actor, unlearn

    if (out is None) == (state_dir is None):
        raise ConfigError("give either --out RUN_DIR (a simulation) or --state-dir DIR")
    who = actor or default_actor()
    if out is not None:
        if registry is not None or blobs is not None:
            raise ConfigError("--registry and --blobs go with --state-dir, not --out")
        report = unlearn(out, client_id, actor=who, on_round=None if as_json else _progress)
    else:
        from shoal.coordinator.unlearning import unlearn_deployment

        assert state_dir is not None
        report = unlearn_deployment(
            state_dir, client_id, actor=who, registry_url=registry, blob_url=blobs
        )
    if as_json:
        _print_json(report.to_json())
        return
    _print_report(report)


def _progress(row: dict[str, Any]) -> None:
    from shoal.cli.simulate import format_row

    console.print(format_row(row))


def _print_report(report: UnlearningReport) -> None:
    table = Table(title=f"unlearning {report.client_id}", show_header=False, title_justify="left")
    fields = report.to_json()
    for key in _SHOWN:
        value = fields[key]
        if isinstance(value, list):
            value = ", ".join(str(item) for item in value) or "-"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        table.add_row(key, escape("-" if value is None else str(value)))
    console.print(table)
    if not report.needs_recomputing:
        console.print(
            "no round of the current model counted or asked the client: nothing to recompute"
        )
    for line in (report.next_step, report.privacy_note):
        if line:
            console.print(escape(line))
