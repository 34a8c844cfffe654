"""What the dashboard shows of a run: its folder's files and its registry, read, never written.

A run's folder (a coordinator's ``--state-dir`` or a simulation's ``--out``)
holds ``metrics.jsonl``, ``summary.json`` once the run ended, ``config.json``
and, unless the job names other URLs, the SQLite registry and the model
blobs. :class:`RunReader` keeps the registry open read-only
(:meth:`~shoal.registry.RegistryLocation.open`) and takes a
:class:`Snapshot` of everything at each poll. A run that has not started
yet (no registry, no rows) is a snapshot that says so, not an error.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.core.errors import RegistryError
from shoal.registry import (
    BlobStore,
    ClientRegistry,
    ClientStatus,
    Database,
    ModelRecord,
    ModelRegistry,
    PrivacyBudget,
    PrivacyLedger,
    blob_location,
    registry_location,
)
from shoal.telemetry.metrics import METRICS_FILE, SUMMARY_FILE, MetricsLog

CONFIG_FILE = "config.json"  # as shoal.coordinator.records writes it (a layer above this one)
SIMULATED_MODEL = "global"  # a simulation's model name; a coordinator's is its run.name
SHOWN_VERSIONS = 25

Row = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """One reading of a run: its rows, summary and config, and what its registry holds.

    ``versions`` are the newest :data:`SHOWN_VERSIONS` versions, newest first;
    ``census`` counts the clients of each (status, device class);
    ``registry_note`` says why the registry parts are empty (not created yet).
    """

    folder: Path
    rows: Sequence[Row] = ()
    summary: Mapping[str, Any] | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    versions: Sequence[ModelRecord] = ()
    versions_total: int = 0
    head: int | None = None
    census: Mapping[tuple[ClientStatus, str | None], int] = field(default_factory=dict)
    budget: PrivacyBudget | None = None
    registry_note: str | None = None

    @property
    def current_round(self) -> int | None:
        """The round of the newest row (None before the first round closes)."""
        return max((row["round"] for row in self.rows), default=None)  # rows: read_rows's

    @property
    def finished(self) -> bool:
        """Whether the run ended (its summary is written)."""
        return self.summary is not None

    @property
    def run_name(self) -> str:
        run = self.config.get("run") or {}
        return str(run.get("name") or self.folder.name)

    def last_row(self, phase: str) -> Row | None:
        """The newest row of ``phase`` (``fit`` or ``evaluate``)."""
        return next((row for row in reversed(self.rows) if row.get("phase") == phase), None)

    def run_ids(self) -> list[str]:
        """The ids the run's privacy budget may be kept under (see :func:`run_ids_of`)."""
        return run_ids_of(self.config)


def run_ids_of(config: Mapping[str, Any]) -> list[str]:
    """The ids a run folder's run is kept under in its registry, from its ``config.json``: a
    coordinator's run_id, then a simulation's run name."""
    coordinator = config.get("coordinator") or {}
    names = [coordinator.get("run_id"), (config.get("run") or {}).get("name")]
    return [str(name) for name in dict.fromkeys(names) if name]


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object's file, or None when it is missing, torn (being replaced as it is read)
    or not an object."""
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class RunReader:
    """Reads one run folder and its registry (at ``registry_url`` when it is not in the folder).

    No model is loaded, so the blob store is never read.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        registry_url: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.location = registry_location(self.folder, registry_url)
        self.run_id = run_id
        self._database: Database | None = None
        self._lock = threading.Lock()  # one opening of the registry for every request thread

    def snapshot(self) -> Snapshot:
        """Everything the page shows, read now."""
        config = read_json(self.folder / CONFIG_FILE) or {}
        files: dict[str, Any] = {
            "folder": self.folder,
            "rows": MetricsLog(self.folder / METRICS_FILE).rows(),
            "summary": read_json(self.folder / SUMMARY_FILE),
            "config": config,
        }
        database = self._open()
        if database is None:
            return Snapshot(**files, registry_note=f"waiting for the registry at {self.location}")
        partial = Snapshot(**files)
        return Snapshot(**files, **self._registry(database, partial))

    def close(self) -> None:
        with self._lock:
            if self._database is not None:
                self._database.close()
                self._database = None

    def _open(self) -> Database | None:
        """The registry, opened read-only once it exists (None until the run creates it)."""
        with self._lock:
            if self._database is None:
                sqlite_file = self.location.sqlite_file
                if sqlite_file is not None and not sqlite_file.is_file():
                    return None
                self._database = self.location.open(read_only=True)
            return self._database

    def _registry(self, database: Database, partial: Snapshot) -> dict[str, Any]:
        models = ModelRegistry(database, BlobStore(blob_location(self.folder, None)))
        names = models.names()
        model = next(
            (name for name in (partial.run_name, SIMULATED_MODEL) if name in names),
            names[0] if names else None,
        )
        versions = [] if model is None else models.list(model)
        head = None if model is None else models.head(model)
        return {
            "model": model,
            "versions": versions[::-1][:SHOWN_VERSIONS],
            "versions_total": len(versions),
            "head": None if head is None else head.version,
            "census": ClientRegistry(database).census(),
            "budget": self._budget(database, partial),
        }

    def _budget(self, database: Database, partial: Snapshot) -> PrivacyBudget | None:
        ledger = PrivacyLedger(database)
        for run_id in [self.run_id] if self.run_id else partial.run_ids():
            try:
                budget = ledger.budget(run_id)
            except RegistryError:
                continue
            if budget is not None:
                return budget
        return None
