"""``shoal.unlearn``: forget a simulated client and retrain the run without it, checked exactly.

The registry's side (retire, find the first participation, roll HEAD back,
mark the old branch) is :func:`shoal.governance.unlearning.forget`; here the
run then resumes (:class:`Simulation` with ``resume=True``), so that the run
layer replays the rounds from the client's first participation on with the
client barred, on the same schedule, seeds and budget rules. Since a seeded
cohort is unchanged by removing a client it did not draw
(:func:`shoal.coordinator.selection.select_cohort`), the rounds before the
first participation are those of a run that never had the client, and so is
the retrained model, bit for bit.

>>> report = shoal.unlearn("runs/digits", "client-00007", actor="alice")  # doctest: +SKIP
>>> report.recomputed_rounds, report.new_head_sha256  # doctest: +SKIP
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from shoal.client.app import app_search_path
from shoal.config import Config
from shoal.coordinator.run import check_same_app
from shoal.coordinator.run_metrics import why_aborted
from shoal.core.errors import NotFoundError, RunError
from shoal.core.folders import hold_folder
from shoal.governance.unlearning import PRIVACY_NOTE, UnlearningReport, forget, run_names
from shoal.registry import ClientRegistry, ModelRegistry
from shoal.registry.participation import ParticipationLog
from shoal.simulation.device_states import simulated_state
from shoal.simulation.population import client_index
from shoal.simulation.runner import MODEL_NAME, Simulation, load_run_config, open_run_models
from shoal.telemetry.metrics import MetricsLog

Row = dict[str, Any]


def default_actor() -> str:
    """Who runs an operator command when no name is given: the local user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry nor USER variable (some containers)
        return "unknown"


def unlearn(
    run_dir: str | Path,
    client_id: str,
    *,
    actor: str | None = None,
    retrain: bool = True,
    client_app: Any = None,
    server_app: Any = None,
    on_round: Callable[[Row], None] | None = None,
) -> UnlearningReport:
    """Forget ``client_id`` in the simulated run in ``run_dir`` and retrain without it.

    Returns the report, also written to ``run_dir/unlearning-<client>.json``.
    ``retrain=False`` only retires and rolls back (``shoal simulate --resume``
    retrains later). ``client_app``/``server_app`` replace the config's apps,
    as for ``shoal.simulate``. Raises :class:`RunError` for a folder without
    a run and :class:`NotFoundError` for a client the run does not have.
    """
    folder = Path(run_dir)
    config = load_run_config(folder)
    simulation = Simulation(
        config,
        folder,
        resume=True,
        client_app=client_app,
        server_app=server_app,
        search_path=app_search_path(config),
    )
    if client_id not in simulation.population.client_ids:
        count = len(simulation.population.client_ids)
        raise NotFoundError(f"the run in {folder} has no client {client_id!r} ({count} clients)")
    with hold_folder(folder, what="run folder"):  # not while a resume of the run runs
        report = _forget(simulation, config, folder, client_id, actor=actor or default_actor())
    if report.needs_recomputing and retrain:
        simulation.run(on_round=on_round)
        report = _retrained(report, folder)
    if config.privacy.enabled:
        report = _with_privacy_note(report)
    report.write(folder)
    return report


def _forget(
    simulation: Simulation, config: Config, folder: Path, client_id: str, *, actor: str
) -> UnlearningReport:
    models = open_run_models(folder)
    try:
        head = models.head(MODEL_NAME)
        if head is not None:  # before anything changes: the retraining must be the run's app's
            check_same_app(head, simulation.apps.architecture, where=str(folder))
        clients = ClientRegistry(models.database)
        _enroll_if_new(simulation, clients, client_id)
        return forget(
            models=models,
            clients=clients,
            participation=ParticipationLog(
                models.database, granularity_s=config.metadata.timestamp_granularity_s
            ),
            names=run_names(folder, run_id=config.run.name, pseudonyms=config.metadata.pseudonyms),
            model=MODEL_NAME,
            run_id=config.run.name,
            client_id=client_id,
            actor=actor,
        )
    finally:
        models.database.close()


def _enroll_if_new(simulation: Simulation, clients: ClientRegistry, client_id: str) -> None:
    """A large simulated fleet enrolls a client when first selected: one never selected is
    enrolled now, so that its retirement is on record and bars it from the replay."""
    if clients.records([client_id]):
        return
    position = np.asarray([client_index(client_id)], dtype=np.int64)
    facts = simulation.fleet.facts(position, at=0.0)
    clients.enroll_population({client_id: simulated_state(facts, 0)})


def _retrained(report: UnlearningReport, folder: Path) -> UnlearningReport:
    """The report with the retrained HEAD and the fit rounds the replay played."""
    models: ModelRegistry = open_run_models(folder)
    try:
        head = models.head(MODEL_NAME)
    finally:
        models.database.close()
    if head is None:
        raise RunError(f"{folder} lost its HEAD while retraining")
    # every fit round after the restart version's is played again (those before the client's
    # first participation too, when the version to return to is older than that: an aborted
    # round committed nothing)
    after = report.restart_round if report.restart_round is not None else 0
    rows = [
        row
        for row in MetricsLog(folder / "metrics.jsonl").rows()
        if row["phase"] == "fit" and row["round"] > after
    ]
    retrained = report.with_head(head, recomputed=[row["round"] for row in rows])
    if rows and not any(row.get("committed") for row in rows):
        # the client is forgotten, but HEAD is the model from before it: say so, and why
        retrained = replace(
            retrained,
            next_step=(
                f"every recomputed round aborted ({why_aborted(rows)}): HEAD is version "
                f"{head.version}, the model from before the client's first round; fix that "
                f"and train on: shoal simulate --resume {folder} --rounds N"
            ),
        )
    return retrained


def _with_privacy_note(report: UnlearningReport) -> UnlearningReport:
    return replace(report, privacy_note=PRIVACY_NOTE)
