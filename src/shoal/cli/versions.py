"""``shoal versions require|list|clear``: the versioning matrix, which software may train a model.

A requirement names a model (the job's architecture name, as a coordinator
serving it knows it) and one component of the client's software (``app``,
``runtime``, ``model_architecture``, ``feature_extractor``): a minimum
version, a set of allowed versions, or both. It is kept in the registry a
coordinator uses and applies from its next check-in and selection on, while
it runs: a client outside the matrix is told INCOMPATIBLE with the reason,
is never selected, and its update is refused. A job's own
``[[versions.require]]`` entries apply beside these. A simulation reads
its run folder's matrix when it starts or resumes.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from shoal.cli.app import app, user_errors
from shoal.cli.operator import (
    Actor,
    AsJson,
    RegistryUrl,
    StateDir,
    _audit,
    _cells,
    _console,
    _database,
    _print_json,
)
from shoal.core.errors import ConfigError
from shoal.registry import Component, Requirement, VersionMatrix
from shoal.registry.location import DEFAULT_STATE_DIR, registry_location
from shoal.registry.models import stored_architectures
from shoal.registry.versioning import MAX_MODEL_NAME

versions_app = typer.Typer(
    help="The versioning matrix: which client software may train which model.",
    no_args_is_help=True,
)
app.add_typer(versions_app, name="versions")


def _parse_model(text: str) -> str:
    if not text or len(text) > MAX_MODEL_NAME:
        raise typer.BadParameter(f"a model name has 1 to {MAX_MODEL_NAME} characters")
    return text


Model = Annotated[
    str,
    typer.Argument(parser=_parse_model, help="The model (the job's architecture name)."),
]


def _requirement_json(model: str, requirement: Requirement) -> dict[str, Any]:
    return {
        "model": model,
        "component": requirement.component.value,
        "minimum": requirement.minimum,
        "allowed": None if requirement.allowed is None else sorted(requirement.allowed),
    }


def _print_requirements(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        _print_json(rows)
        return
    if not rows:
        _console().print("no version requirements: every client version may train")
        return
    table = Table(title="version requirements", title_justify="left")
    for column in ("model", "component", "minimum", "allowed"):
        table.add_column(column)
    for row in rows:
        allowed = None if row["allowed"] is None else ", ".join(row["allowed"])
        table.add_row(*_cells(row["model"], row["component"], row["minimum"], allowed))
    _console().print(table)


@versions_app.command("require")
@user_errors
def require_versions(
    model: Model,
    component: Annotated[
        Component,
        typer.Option("--component", case_sensitive=False, help="The software it constrains."),
    ],
    minimum: Annotated[
        str | None, typer.Option("--minimum", help="The lowest version allowed, e.g. 2.4.0.")
    ] = None,
    allowed: Annotated[
        list[str] | None,
        typer.Option("--allowed", help="A version allowed (repeatable): only these may train."),
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Set (or replace) what one component's version must be to train MODEL."""
    if minimum is None and not allowed:
        raise ConfigError("give --minimum, --allowed, or both")
    for version in allowed or []:
        if not version or len(version) > 64:
            raise typer.BadParameter("a version has 1 to 64 characters", param_hint="--allowed")
    location = registry_location(state_dir, registry)
    new = location.sqlite_file is not None and not location.sqlite_file.is_file()
    with _database(state_dir, registry, must_exist=False) as database:
        requirement = VersionMatrix(database).require(
            model, component, minimum=minimum, allowed=allowed or None
        )
        details = _requirement_json(model, requirement)
        _audit(database, actor).append("versions_require", subject=model, details=details)
        architectures = stored_architectures(database)
    _print_requirements([_requirement_json(model, requirement)], as_json=as_json)
    if new:  # ahead of the coordinator's first start, or a mistyped folder
        warning = f"no registry was at {location.sqlite_file}: made one, holding this requirement"
    elif architectures and model not in architectures:
        named = ", ".join(sorted(architectures))
        warning = (
            f"no version in the registry is of model architecture {model!r} (its versions' "
            f"architectures: {named}): the matrix keys on the architecture, not a model's name"
        )
    else:
        return
    typer.secho(f"warning: {warning}", fg="yellow", err=True)  # beside --json's stdout


@versions_app.command("list")
@user_errors
def list_versions(
    model: Annotated[
        str | None,
        typer.Argument(metavar="[MODEL]", help="Only this model (default: every model)."),
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """The requirements of every model (or of MODEL)."""
    with _database(state_dir, registry) as database:
        matrix = VersionMatrix(database)
        models = matrix.models() if model is None else [model]
        rows = [
            _requirement_json(name, requirement)
            for name in models
            for requirement in matrix.requirements(name)
        ]
    _print_requirements(rows, as_json=as_json)


@versions_app.command("clear")
@user_errors
def clear_versions(
    model: Model,
    component: Annotated[
        Component | None,
        typer.Option(
            "--component", case_sensitive=False, help="Only this one (default: all of MODEL's)."
        ),
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Drop MODEL's requirements (or the one on --component)."""
    with _database(state_dir, registry) as database:
        removed = VersionMatrix(database).remove(model, component)
        details = {"component": None if component is None else component.value, "removed": removed}
        _audit(database, actor).append("versions_clear", subject=model, details=details)
    if as_json:
        _print_json({"model": model, "removed": removed})
        return
    which = "requirements" if component is None else f"{component.value} requirement"
    _console().print(f"removed {removed} {which} of {model}")
