"""``shoal models list|show|rollback``: the model registry's versions and HEAD."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from shoal.cli.app import app, user_errors
from shoal.cli.operator import (
    AsJson,
    BlobUrl,
    RegistryUrl,
    StateDir,
    _cells,
    _console,
    _database,
    _interactive,
    _iso,
    _key_value_table,
    _print_json,
    _status,
    _when,
)
from shoal.core.errors import NotFoundError, RegistryError
from shoal.registry import (
    BlobStore,
    ModelRecord,
    ModelRegistry,
    ModelStatus,
    blob_location,
)
from shoal.registry.location import DEFAULT_STATE_DIR

models_app = typer.Typer(
    help="Model versions: list, inspect, roll HEAD back.", no_args_is_help=True
)
app.add_typer(models_app, name="models")

_FIRST_METRICS = ("accuracy", "loss")
_SHOWN_METRICS = 3


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
