"""Unlearning on a deployed coordinator: retire, roll back and report; the next start retrains.

The registry's side is :func:`shoal.governance.unlearning.forget`, run on the
coordinator's state folder (its registry, blobs, ``pseudonym.key`` and the
``config.json`` it started with). The retraining is the coordinator's own
resume: ``shoal coordinator serve`` restarts from HEAD, now the version
before the client's first participation, and plays the rounds from there on
the same schedule with the client barred (RETIRED). Run it while the
coordinator is stopped: the state folder is held while it runs, so a
running coordinator (which holds it) makes it refuse in one line. (A
coordinator that somehow ran beside it would not commit on top of the old
HEAD either: its next commit is refused, HEAD having moved.)
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from shoal.config import Config, parse_config
from shoal.coordinator.records import CONFIG_FILE
from shoal.core.errors import RunError
from shoal.core.folders import hold_folder
from shoal.governance.unlearning import PRIVACY_NOTE, UnlearningReport, forget, run_names
from shoal.registry import (
    BlobStore,
    ClientRegistry,
    ModelRegistry,
    blob_location,
    registry_location,
)
from shoal.registry.participation import ParticipationLog


def deployment_config(state_dir: str | Path) -> Config:
    """The config a coordinator's run started with (kept in its state folder)."""
    path = Path(state_dir) / CONFIG_FILE
    if not path.exists():
        raise RunError(f"{state_dir} holds no coordinator run (no {CONFIG_FILE})")
    try:
        return parse_config(json.loads(path.read_text()))
    except ValueError as exc:
        raise RunError(f"{path} is corrupt: {exc}") from exc


def unlearn_deployment(
    state_dir: str | Path,
    client_id: str,
    *,
    actor: str,
    registry_url: str | None = None,
    blob_url: str | None = None,
) -> UnlearningReport:
    """Forget ``client_id`` in the coordinator run kept in ``state_dir``; see the module
    docstring. The report is also written to ``state_dir/unlearning-<client>.json``.

    ``registry_url``/``blob_url`` default to the run's ``[coordinator]`` settings.
    """
    folder = Path(state_dir)
    config = deployment_config(folder)
    section = config.coordinator
    with hold_folder(folder, what="coordinator.state_dir"):  # no coordinator serves it now
        database = registry_location(folder, registry_url or section.registry_url).open()
        blobs = BlobStore(blob_location(folder, blob_url or section.blob_url))
        try:
            models = ModelRegistry(database, blobs)
            report = forget(
                models=models,
                clients=ClientRegistry(database),
                participation=ParticipationLog(
                    database, granularity_s=config.metadata.timestamp_granularity_s
                ),
                names=run_names(
                    folder, run_id=section.run_id, pseudonyms=config.metadata.pseudonyms
                ),
                model=config.run.name,
                run_id=section.run_id,
                client_id=client_id,
                actor=actor,
            )
        finally:
            database.close()
    if report.needs_recomputing:
        report = replace(
            report,
            next_step=(
                f"the next `shoal coordinator serve` resumes from version "
                f"{report.restart_version} and trains rounds {(report.restart_round or 0) + 1} "
                f"to {config.run.rounds} again without the client"
            ),
        )
    if config.privacy.enabled:
        report = replace(report, privacy_note=PRIVACY_NOTE)
    report.write(folder)
    return report
