"""``shoal models list|show|mark|rollback|export``: the model registry's versions and HEAD."""

from __future__ import annotations

import dataclasses
import enum
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shoal.cli.app import app, user_errors
from shoal.cli.operator import (
    MAX_REGISTRY_INT,
    Actor,
    AsJson,
    BlobUrl,
    RegistryUrl,
    StateDir,
    _audit,
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
from shoal.core.errors import ModelError, NotFoundError, RegistryError
from shoal.core.files import write_whole
from shoal.core.parameters import Parameters
from shoal.core.torch_interop import import_torch, state_dict_from_parameters
from shoal.registry import (
    BlobStore,
    Database,
    ModelRecord,
    ModelRegistry,
    ModelStatus,
    blob_location,
)
from shoal.registry.location import DEFAULT_STATE_DIR

models_app = typer.Typer(
    help="Model versions: list, inspect, mark good or bad, roll HEAD back, export.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

_FIRST_METRICS = ("accuracy", "loss")
_SHOWN_METRICS = 3
_UNBOUNDED = 10_000  # a terminal width no table needs: what measures a table's natural width


def _model_json(record: ModelRecord, *, head: bool) -> dict[str, Any]:
    fields = dataclasses.asdict(record)
    signed = record.signed
    return fields | {
        "signed": None
        if signed is None
        else {
            "run_id": signed.run_id,
            "key_id": signed.key_id,
            "signature": signed.signature.hex(),
        },
        "status": record.status.value,
        "status_changed_at": _iso(record.status_changed_at),
        "created_at": _iso(record.created_at),
        "metrics": dict(record.metrics),
        "head": head,
    }


def _short_metrics(metrics: Mapping[str, Any]) -> str:
    shown_keys = [key for key, value in metrics.items() if value is not None]  # None says nothing
    keys = [key for key in _FIRST_METRICS if key in shown_keys]
    keys += sorted(key for key in shown_keys if key not in _FIRST_METRICS)
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
    with _database(state_dir, registry, read_only=True) as database:
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
    console = _console()
    console.print(_versions_table(rows, console) if rows else "no model versions in the registry")


def _versions_table(rows: list[tuple[ModelRecord, bool]], console: Console) -> Table:
    """The versions as an 80-column terminal still shows them whole: HEAD beside its version,
    the reason beside the status, the name only when there are several, and the sha256 left
    to ``show`` and ``--json``."""
    names = sorted({record.name for record, _ in rows})
    several = len(names) > 1
    title = "model versions" if several else f"versions of model {names[0]}"
    table = Table(title=Text(title), title_justify="left")
    if several:
        table.add_column("name", overflow="fold")
    for column in ("version", "round", "parent"):
        table.add_column(column, justify="right")
    table.add_column("status", overflow="fold")
    table.add_column("created (UTC)")
    created = table.columns[-1]
    table.add_column("metrics", overflow="fold")
    for record, is_head in rows:
        version = Text(str(record.version))
        if is_head:
            version.append(" HEAD", style="bold")
        status = _status(record.status)
        if record.status_reason:
            status.append(f" ({record.status_reason})")
        table.add_row(
            *_cells(
                *([record.name] if several else []),
                version,
                str(record.round),
                record.parent,
                status,
                _when(record.created_at),
                _short_metrics(record.metrics),
            )
        )
    unbounded = console.options.update_width(_UNBOUNDED)
    if console.measure(table, options=unbounded).maximum > console.width:
        # the time under the date: else rich narrows the widest columns (the metrics, the
        # status) down to its width before it wraps it
        created.max_width = len("YYYY-MM-DD")
    return table


@models_app.command("show")
@user_errors
def show_model(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[
        int, typer.Argument(metavar="VERSION", min=0, max=MAX_REGISTRY_INT, help="Version number.")
    ],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    as_json: AsJson = False,
) -> None:
    """Every field of one model version, its metrics included."""
    with _database(state_dir, registry, read_only=True) as database:
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


class Verdict(enum.Enum):
    """What ``shoal models mark`` records: an operator's judgement of a version."""

    GOOD = "good"
    BAD = "bad"


@models_app.command("mark")
@user_errors
def mark_model(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[
        int, typer.Argument(metavar="VERSION", min=0, max=MAX_REGISTRY_INT, help="Version number.")
    ],
    verdict: Annotated[
        Verdict,
        typer.Argument(metavar="VERDICT", case_sensitive=False, help="good or bad."),
    ],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept with the version).")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Mark a version good or bad, with the reason; a BAD version is never rolled back to.

    Marking HEAD bad does not move HEAD: roll back to a good version as well.
    """
    if not reason.strip():
        raise typer.BadParameter("give a reason", param_hint="--reason")
    with _database(state_dir, registry) as database:
        models = _models(database, state_dir, blobs, actor)
        status = ModelStatus.GOOD if verdict is Verdict.GOOD else ModelStatus.BAD
        record = models.mark(name, version, status, reason=reason)
        head = models.head(name)
    is_head = head is not None and head.version == record.version
    if as_json:
        _print_json(_model_json(record, head=is_head))
        return
    console = _console()
    console.print(f"{name} version {version}: {status.value} ({reason})", markup=False)
    if is_head and status is ModelStatus.BAD:
        console.print(
            f"version {version} is HEAD: a run resumed with [playbook] on goes back to its "
            "newest GOOD ancestor first; with it off, new rounds build on it until "
            f"`shoal models rollback {name} VERSION`. A round that makes its weights again is "
            "not committed: suspend the clients behind it (shoal clients suspend)",
            markup=False,
            style="yellow",
        )


@models_app.command("rollback")
@user_errors
def rollback_model(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[
        int,
        typer.Argument(
            metavar="VERSION", min=0, max=MAX_REGISTRY_INT, help="The version HEAD moves to."
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why (kept in the audit log's entry).")
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Move HEAD of NAME to VERSION: new rounds build on it; later versions stay, for audit.

    Refuses a version marked BAD and one whose stored blob is missing or corrupt.
    """
    if reason is not None and not reason.strip():
        raise typer.BadParameter("give a reason, or leave --reason out", param_hint="--reason")
    with _database(state_dir, registry) as database:
        models = _models(database, state_dir, blobs, actor)
        target = models.get(name, version)
        if target.status is ModelStatus.BAD:
            raise RegistryError(
                f"version {version} of {name} is marked BAD: not rolling back to it"
            )
        head = models.head(name)
        previous = None if head is None else head.version
        if previous != version and not yes:
            _confirm(f"Move HEAD of {name} from version {previous} to version {version}?")
        record = models.rollback(name, version, reason=reason)  # verifies the blob
    if as_json:
        _print_json(_model_json(record, head=True) | {"previous_head": previous})
    elif previous == version:
        _console().print(f"HEAD of {name} is already version {version}", markup=False)
    else:
        _console().print(f"HEAD of {name}: version {previous} -> version {version}", markup=False)


def _models(
    database: Database, state_dir: Path, blobs: str | None, actor: str | None
) -> ModelRegistry:
    """The model registry, its changes audited as the operator's."""
    store = BlobStore(blob_location(state_dir, blobs))
    return ModelRegistry(database, store, audit=_audit(database, actor))


def _confirm(question: str) -> None:
    if not _interactive():
        raise typer.BadParameter("no terminal to confirm the rollback on", param_hint="--yes")
    typer.confirm(question, default=False, abort=True, err=True)


class ExportFormat(enum.Enum):
    """The file formats ``shoal models export`` writes."""

    SAFETENSORS = "safetensors"
    NPZ = "npz"
    TORCH = "torch"


def _write_npz(parameters: Parameters, handle: BinaryIO) -> None:
    """One ``.npy`` member per tensor, named as the layout names it, in its shape and dtype.

    Written member by member (as :func:`numpy.savez` does) so that any tensor name is
    allowed, ``file`` included.
    """
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as npz:
        for spec, array in zip(parameters.layout.specs, parameters.to_arrays(), strict=True):
            with npz.open(f"{spec.name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _write_torch(parameters: Parameters, handle: BinaryIO) -> None:
    """A ``state_dict``: an OrderedDict of tensors in the layout's names, shapes and dtypes."""
    torch = import_torch("exporting a model as a PyTorch state_dict")
    torch.save(OrderedDict(state_dict_from_parameters(parameters)), handle)


_CONVERTERS: dict[ExportFormat, Callable[[Parameters, BinaryIO], None]] = {
    ExportFormat.NPZ: _write_npz,
    ExportFormat.TORCH: _write_torch,
}


def _version_or_head(text: str) -> int | None:
    """A version number, or None for ``head``."""
    if text.strip().lower() == "head":
        return None
    if not text.strip().isdigit():
        raise typer.BadParameter(f"{text!r} is neither a version number nor head")
    if int(text) > MAX_REGISTRY_INT:
        raise typer.BadParameter(f"{text} is above the largest version, {MAX_REGISTRY_INT}")
    return int(text)


def _version_record(models: ModelRegistry, name: str, number: int | None) -> ModelRecord:
    """Version ``number`` of ``name`` (None: its HEAD); a NotFoundError when there is none."""
    record = models.head(name) if number is None else models.get(name, number)
    if record is None:
        raise NotFoundError(f"no model named {name!r} in the registry")
    return record


@models_app.command("export")
@user_errors
def export_model(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[
        str,
        typer.Argument(
            metavar="VERSION",
            help="Version number, or head for the version new rounds build on.",
        ),
    ],
    export_format: Annotated[
        ExportFormat,
        typer.Option("--format", case_sensitive=False, help="The file format to write."),
    ],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="The file to write.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing FILE.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    as_json: AsJson = False,
) -> None:
    """Write a model version to FILE, checked against its sha256, for use outside Shoal.

    safetensors is the registry's own format (the layout and sha256 in its
    metadata); npz holds one array per tensor, under the layout's names, in
    the original shapes and dtypes; torch is a state_dict saved with
    torch.save (needs the torch extra), which load_state_dict takes as it is.
    """
    number = _version_or_head(version)
    if out.exists() and not force:
        raise ModelError(f"{out} exists: refusing to overwrite it (pass --force)")
    with _database(state_dir, registry, read_only=True) as database:
        models = ModelRegistry(database, BlobStore(blob_location(state_dir, blobs)))
        record = _version_record(models, name, number)
        blob = models.blobs.get(record.blob)
    parameters = Parameters.from_bytes(blob, expected_sha256=record.sha256)  # refuses corruption
    convert = _CONVERTERS.get(export_format)
    if convert is None:  # safetensors: the registry's own bytes, layout and sha256 inside
        _write_file(out, lambda handle: handle.write(blob))
    else:
        _write_file(out, lambda handle: convert(parameters, handle))
    if as_json:
        _print_json(
            {
                "name": name,
                "version": record.version,
                "format": export_format.value,
                "out": str(out),
                "sha256": record.sha256,
                "tensors": len(parameters.layout.specs),
            }
        )
        return
    _console().print(
        f"wrote {name} version {record.version} ({len(parameters.layout.specs)} tensors, "
        f"{export_format.value}) to {out}",
        markup=False,
    )


def _write_file(out: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``out`` whole or not at all (:func:`write_whole`), or one ModelError."""
    try:
        write_whole(out, write)
    except OSError as exc:
        raise ModelError(f"cannot write {out}: {exc.strerror or exc}") from exc


# --- clients -----------------------------------------------------------------------------
