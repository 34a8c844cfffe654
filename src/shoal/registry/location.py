"""Where a coordinator's registries live: a database URL and a blob URL, or its state folder.

A coordinator keeps its state in one folder (``coordinator-state`` by
default): the SQLite registry in ``STATE/registry/registry.db`` and the
model blobs in ``STATE/blobs``. Either can be moved elsewhere by URL (a
PostgreSQL database, an object store). The coordinator and the operator
commands resolve both the same way, through these two functions:

>>> str(registry_location(Path("coordinator-state"), None))
'coordinator-state/registry/registry.db'
>>> blob_location(Path("coordinator-state"), "s3://bucket/shoal")
's3://bucket/shoal'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError

from shoal.config import DEFAULT_STATE_DIR as CONFIG_STATE_DIR
from shoal.core.errors import ConfigError, RegistryError
from shoal.registry.database import DEFAULT_FILE_NAME, Database, open_database

DEFAULT_STATE_DIR = Path(CONFIG_STATE_DIR)  # the coordinator's default, as the config says
REGISTRY_FOLDER = "registry"
BLOB_FOLDER = "blobs"


@dataclass(frozen=True, slots=True)
class RegistryLocation:
    """A registry database: ``url`` when one was given, else the SQLite file in ``folder``."""

    url: str | None
    folder: Path

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite file this location names (None for PostgreSQL or an in-memory database)."""
        if self.url is None:
            return self.folder / DEFAULT_FILE_NAME
        try:
            parsed = sa.make_url(self.url)
        except ArgumentError as exc:
            raise ConfigError(f"not a database URL: {self.url!r}") from exc
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return None
        return Path(parsed.database)

    def __str__(self) -> str:
        sqlite_file = self.sqlite_file
        if sqlite_file is not None:
            return str(sqlite_file)
        assert self.url is not None  # only a URL names a non-file database
        parsed = sa.make_url(self.url)  # sqlite_file parsed it already
        return self.url if parsed.password is None else parsed.render_as_string(hide_password=True)

    def open(self, *, must_exist: bool = False, read_only: bool = False) -> Database:
        """Open (and migrate) the database; ``must_exist`` refuses to create a SQLite file.

        An operator's query on a mistyped state folder should fail, not
        answer from a new, empty registry. ``read_only`` (which implies
        ``must_exist``) neither migrates nor writes: a viewer's open.
        """
        sqlite_file = self.sqlite_file
        if (must_exist or read_only) and sqlite_file is not None and not sqlite_file.is_file():
            raise RegistryError(
                f"no registry database at {sqlite_file}: pass the coordinator's --state-dir, "
                "or --registry URL"
            )
        folder = self.folder if self.url is None else None
        return open_database(self.url, folder=folder, migrate=not read_only)


def registry_location(state_dir: Path, url: str | None) -> RegistryLocation:
    """The registry of a coordinator: ``url`` if given, else ``state_dir/registry/registry.db``."""
    return RegistryLocation(url=url or None, folder=Path(state_dir) / REGISTRY_FOLDER)


def blob_location(state_dir: Path, url: str | None) -> str:
    """Where a coordinator's blobs live (for ``BlobStore``): ``url``, else ``state_dir/blobs``."""
    return url or str(Path(state_dir) / BLOB_FOLDER)
