"""Unlearning in a coordinator's state folder: retire, roll back past a replayed branch, report;
the coordinator's next start resumes from there with the client barred."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.support.jobs import bare_config

from shoal.aggregation.strategy import make_strategy
from shoal.config import Config, config_to_dict
from shoal.coordinator.app import ServerApp
from shoal.coordinator.records import CONFIG_FILE, RunRecords
from shoal.coordinator.rounds import RoundSettings
from shoal.coordinator.run import Run, RunParts
from shoal.coordinator.unlearning import unlearn_deployment
from shoal.core import Parameters
from shoal.core.errors import ConfigError, NotFoundError, RunError
from shoal.core.folders import hold_folder
from shoal.governance.pseudonyms import Pseudonyms
from shoal.registry import (
    BlobStore,
    ClientRegistry,
    ClientStatus,
    DeviceState,
    ModelRegistry,
    ModelStatus,
    blob_location,
    registry_location,
)
from shoal.registry.participation import Participation, ParticipationLog

RUN_ID = "deploy-1"
PLAYBOOK = "accuracy fell 30 points: rolled back by the playbook"
# (round, participants, roll back to this version first): round 3 was played, found BAD,
# rolled back and played again; client-c's round-3 version is off the lineage
HISTORY = [
    (1, ("client-a", "client-b"), None),
    (2, ("client-a", "client-b"), None),
    (3, ("client-b", "client-c"), None),
    (3, ("client-b", "client-d"), 2),
    (4, ("client-a", "client-c"), None),
]


def job(state: Path) -> Config:
    return bare_config(
        [
            "run.name=net",
            "run.rounds=5",
            "data.num_clients=4",
            "round.clients_per_round=2",
            f"coordinator.run_id={RUN_ID!r}",
            f"coordinator.state_dir={str(state)!r}",
        ]
    )


def model(value: float) -> Parameters:
    return Parameters.from_arrays([np.full(3, value, np.float32)])


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A coordinator's state folder after the rounds of HISTORY: versions 0-5, HEAD at 5."""
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps(config_to_dict(job(folder))))
    database = registry_location(folder, None).open()
    try:
        models = ModelRegistry(database, BlobStore(blob_location(folder, None)))
        clients = ClientRegistry(database)
        for name in ("client-a", "client-b", "client-c", "client-d"):
            clients.enroll(name, DeviceState())
        names = Pseudonyms.in_folder(folder, run_id=RUN_ID)
        log = ParticipationLog(database)
        models.commit("net", model(0.0), round=0, architecture_version="tiny")
        for round_number, participants, back_to in HISTORY:
            if back_to is not None:
                models.mark("net", back_to + 1, ModelStatus.BAD, reason=PLAYBOOK)
                models.rollback("net", back_to)
            record = models.commit(
                "net",
                model(float(round_number)),
                round=round_number,
                architecture_version="tiny",
                metrics={"accuracy": 0.5 + round_number / 10},
            )
            log.record(
                [
                    Participation(
                        run_id=RUN_ID,
                        round=round_number,
                        participant=names.of(client, round_number=round_number),
                        model_version=record.version,
                    )
                    for client in participants
                ]
            )
    finally:
        database.close()
    return folder


def open_models(folder: Path) -> ModelRegistry:
    return ModelRegistry(
        registry_location(folder, None).open(), BlobStore(blob_location(folder, None))
    )


def test_rollback_goes_before_the_first_participation_on_the_lineage(state: Path) -> None:
    report = unlearn_deployment(state, "client-c", actor="ops")
    assert report.participated_rounds == (4,)  # its round 3 is on the abandoned branch
    assert report.first_participation == 4
    assert (report.restart_version, report.restart_round) == (4, 3)
    assert report.superseded_versions == (3, 5)  # on every branch
    assert (report.old_head_version, report.new_head_version) == (5, 4)
    assert report.old_head_accuracy == pytest.approx(0.9)
    assert report.new_head_accuracy == pytest.approx(0.8)
    assert not report.retrained and report.recomputed_rounds == ()
    assert "resumes from version 4 and trains rounds 4 to 5" in (report.next_step or "")
    models = open_models(state)
    try:
        head = models.head("net")
        assert head is not None and head.version == 4
        third = models.get("net", 3).status_reason or ""  # its own verdict kept after it
        assert third.startswith("superseded by unlearning (ops)") and third.endswith(PLAYBOOK)
        fifth = models.get("net", 5)
        assert fifth.status is ModelStatus.BAD and "unlearning (ops)" in (fifth.status_reason or "")
        assert len(models.list("net")) == 6  # nothing deleted
        assert ClientRegistry(models.database).get("client-c").status is ClientStatus.RETIRED
    finally:
        models.database.close()
    assert json.loads((state / "unlearning-client-c.json").read_text())["restart_version"] == 4


def test_the_next_start_resumes_from_the_restart_version_with_the_client_barred(
    state: Path,
) -> None:
    unlearn_deployment(state, "client-d", actor="ops")  # first counted in replayed round 3
    config = job(state)
    models = open_models(state)
    try:
        records = RunRecords(state, models, ClientRegistry(models.database), model="net")
        run = Run(
            config,
            app=ServerApp(),
            store=records,
            parts=RunParts(
                RoundSettings(clients_per_round=2, over_selection=1.0, quorum=1.0, deadline_s=10),
                make_strategy("fedavg"),
            ),
            architecture="tiny",
            resume=True,
            run_id=RUN_ID,
        )
        engine = run.open(lambda: pytest.fail("a resume builds no client"))
        assert run.first_round == 3
        np.testing.assert_array_equal(engine.parameters.vector, 2.0)  # version 2, round 2
        assert "client-d" in run.barred()
        assert run.eligible(["client-a", "client-d"]) == ("client-a",)
    finally:
        models.database.close()


def test_a_client_that_never_counted_moves_nothing(state: Path) -> None:
    models = open_models(state)
    ClientRegistry(models.database).enroll("client-e", DeviceState())
    models.database.close()
    report = unlearn_deployment(state, "client-e", actor="ops")
    assert report.first_participation is None and report.next_step is None
    assert report.new_head_version == report.old_head_version == 5


def test_unknown_client_missing_key_and_missing_run(state: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no client 'client-z'"):
        unlearn_deployment(state, "client-z", actor="ops")
    (state / "pseudonym.key").unlink()
    with pytest.raises(ConfigError, match=r"pseudonym\.key is missing"):
        unlearn_deployment(state, "client-a", actor="ops")
    models = open_models(state)
    try:  # refused before anything changed
        assert ClientRegistry(models.database).get("client-a").status is ClientStatus.ACTIVE
        head = models.head("net")
        assert head is not None and head.version == 5
    finally:
        models.database.close()
    with pytest.raises(RunError, match="holds no coordinator run"):
        unlearn_deployment(tmp_path / "nothing", "client-a", actor="ops")


def test_unlearning_refuses_a_state_folder_a_coordinator_serves(state: Path) -> None:
    """The module's rule, "run it while the coordinator is stopped", was the operator's to
    keep: a coordinator serving the folder holds it, and unlearning now refuses at once."""
    with (
        hold_folder(state, what="coordinator.state_dir"),  # the running coordinator's hold
        pytest.raises(RunError, match="is in use by another shoal process"),
    ):
        unlearn_deployment(state, "client-a", actor="ops")
    models = open_models(state)
    try:  # nothing changed
        assert ClientRegistry(models.database).get("client-a").status is ClientStatus.ACTIVE
    finally:
        models.database.close()
    report = unlearn_deployment(state, "client-a", actor="ops")  # stopped: it goes ahead
    assert report.first_participation is not None
