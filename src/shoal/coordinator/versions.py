"""Global model versions in a run folder: append-only, content-addressed, rollback-able.

Layout of ``RUN/versions/``::

    index.jsonl          one record per committed version, append-only
    HEAD                 the version new rounds build on (moves on rollback)
    v000003.safetensors  the model of version 3, with its sha256 inside
    v000003.state.safetensors  the server optimizer's state after version 3

A version is written blob first, then its index line, then HEAD, each step
atomic: a crash at any point leaves the last committed version intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoal.core.errors import ModelError, RunError
from shoal.core.parameters import Parameters
from shoal.core.transforms import TransformState, state_from_bytes, state_to_bytes


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One committed global model: where it came from and what it scored."""

    version: int
    round: int
    parent: int | None
    sha256: str
    virtual_time_s: float
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return f"v{self.version:06d}.safetensors"

    @property
    def state_file_name(self) -> str:
        return f"v{self.version:06d}.state.safetensors"


class VersionStore:
    """The versions of one run, in ``folder`` (created if missing)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._index = self.folder / "index.jsonl"
        self._head = self.folder / "HEAD"
        self._records = self._read_index()
        self._head_version = int(self._head.read_text().strip()) if self._head.exists() else None

    def _read_index(self) -> dict[int, ModelVersion]:
        records: dict[int, ModelVersion] = {}
        if not self._index.exists():
            return records
        text = self._index.read_text()
        if text and not text.endswith("\n"):
            # a crash tore the last line; cut it so the next append starts clean
            text = text[: text.rfind("\n") + 1]
            partial = self._index.with_name("index.jsonl.partial")
            partial.write_text(text)
            partial.replace(self._index)
        for line in text.splitlines():
            try:
                record = ModelVersion(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a line torn by a crash mid-append never had its HEAD written
            records[record.version] = record
        return records

    def versions(self) -> list[ModelVersion]:
        """Every committed version, oldest first (torn lines ignored)."""
        return list(self._records.values())

    def get(self, version: int) -> ModelVersion:
        try:
            return self._records[version]
        except KeyError:
            raise RunError(f"no version {version} in {self.folder}") from None

    def head(self) -> ModelVersion | None:
        """The version new rounds build on, or None for an empty store."""
        return None if self._head_version is None else self.get(self._head_version)

    def commit(
        self,
        parameters: Parameters,
        *,
        round_number: int,
        virtual_time_s: float,
        metrics: Mapping[str, Any],
        optimizer_state: TransformState = (),
    ) -> ModelVersion:
        """Persist a new version on top of HEAD and move HEAD to it."""
        head = self.head()
        record = ModelVersion(
            version=max(self._records, default=-1) + 1,
            round=round_number,
            parent=None if head is None else head.version,
            sha256=parameters.sha256(),
            virtual_time_s=virtual_time_s,
            metrics=dict(metrics),
        )
        parameters.save(
            self.folder / record.file_name, metadata={"shoal.version": str(record.version)}
        )
        _save_state(self.folder / record.state_file_name, optimizer_state)
        with self._index.open("a") as index:
            index.write(json.dumps(asdict(record), sort_keys=True) + "\n")
            index.flush()
            os.fsync(index.fileno())
        self._records[record.version] = record
        self._write_head(record.version)
        return record

    def load(self, version: int) -> Parameters:
        """The parameters of ``version``, verified against its recorded sha256."""
        record = self.get(version)
        return Parameters.load(self.folder / record.file_name, expected_sha256=record.sha256)

    def load_state(self, version: int, template: TransformState) -> TransformState:
        """The optimizer state saved with ``version``, shaped like ``template``."""
        path = self.folder / self.get(version).state_file_name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RunError(f"cannot read the optimizer state of version {version}: {exc}") from exc
        try:
            return state_from_bytes(template, data)
        except ModelError as exc:
            raise RunError(
                f"version {version}'s optimizer state does not fit this strategy: {exc}"
            ) from exc

    def rollback(self, version: int) -> ModelVersion:
        """Point HEAD at an earlier version; later versions stay on disk for audit."""
        record = self.get(version)
        self.load(version)  # refuse to roll back onto a corrupt blob
        self._write_head(record.version)
        return record

    def _write_head(self, version: int) -> None:
        partial = self._head.with_name("HEAD.partial")
        partial.write_text(f"{version}\n")
        partial.replace(self._head)
        self._head_version = version


def _save_state(path: Path, state: TransformState) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(state_to_bytes(state))
    partial.replace(path)
