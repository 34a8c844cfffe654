"""The shared parts of the operator's commands: registry options, tables, JSON, durations.

``shoal models``, ``shoal clients`` and ``shoal certs`` (in ``models.py``,
``clients.py`` and ``certs.py``) read and change the registries a
coordinator uses, found the same way it finds them
(:func:`~shoal.registry.registry_location`): ``--registry URL``, else the
SQLite file in ``--state-dir``. Every command prints a rich table, or with
``--json`` one JSON array or object and nothing else on stdout. A mistake
(an unknown id, a BAD rollback target) is one red line on stderr and exit 1;
a bad option value exits 2.
"""

from __future__ import annotations

import getpass
import json
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shoal.core.errors import ConfigError
from shoal.core.identifiers import check_client_id
from shoal.registry import (
    AuditLog,
    ClientStatus,
    Database,
    ModelStatus,
    registry_location,
)

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
Actor = Annotated[
    str | None,
    typer.Option(
        "--actor",
        metavar="NAME",
        envvar="SHOAL_ACTOR",
        show_default="your login name",
        help="Who runs this command, as the audit log records it.",
    ),
]
AsJson = Annotated[
    bool, typer.Option("--json", help="Print JSON (an array or an object) instead of a table.")
]

MAX_REGISTRY_INT = 2**31 - 1
"""The largest version number, count or limit the registry takes (PostgreSQL's INTEGER)."""

_STATUS_STYLE = {
    ModelStatus.GOOD: "green",
    ModelStatus.BAD: "red",
    ModelStatus.CANDIDATE: "yellow",
    ClientStatus.ACTIVE: "green",
    ClientStatus.SUSPENDED: "yellow",
    ClientStatus.RETIRED: "dim",
}

# --- shared helpers ----------------------------------------------------------------------


@contextmanager
def _database(
    state_dir: Path, url: str | None, *, must_exist: bool = True, read_only: bool = False
) -> Iterator[Database]:
    """The registry, opened as the coordinator opens it; ``read_only`` (every command that only
    reads) neither migrates nor takes SQLite's write lock, so that it never waits on, nor makes
    wait, the writes of a coordinator that is running."""
    location = registry_location(state_dir, url)
    database = location.open(must_exist=must_exist, read_only=read_only)
    try:
        yield database
    finally:
        database.close()


def _actor(name: str | None) -> str:
    """The operator the audit log names: ``--actor``, else the login, else ``operator``."""
    if name is not None and name.strip():
        return name.strip()
    try:
        return getpass.getuser() or "operator"
    except (OSError, KeyError):  # no login name (a container without a passwd entry)
        return "operator"


def _audit(database: Database, actor: str | None) -> AuditLog:
    """The audit log, with the operator who runs the command as its actor."""
    return AuditLog(database, actor=_actor(actor))


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


def parse_client_id(text: str) -> str:
    """A client id as the registry accepts it (:func:`shoal.core.check_client_id`)."""
    try:
        return check_client_id(text, error=ConfigError)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def _interactive() -> bool:
    """Whether a person can answer a prompt: stdin is an open terminal (not closed, not a pipe)."""
    stdin = sys.stdin
    return stdin is not None and not stdin.closed and stdin.isatty()


# --- models ------------------------------------------------------------------------------
