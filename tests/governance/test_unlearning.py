"""Unlearning: the unlearned model is the model of a run that never had the client, bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.support.jobs import bare_config

import shoal
from shoal.config import Config
from shoal.core.errors import NotFoundError, RegistryError, RunError
from shoal.core.folders import hold_folder
from shoal.governance.model_signing import PUBLIC_KEY_FILE, load_public_key
from shoal.governance.pseudonyms import Pseudonyms
from shoal.registry import ClientRegistry, ClientStatus, ModelStatus, verify_audit_log
from shoal.registry.audit import AuditLog
from shoal.registry.participation import ParticipationLog
from shoal.simulation.population import ClientNames
from shoal.simulation.runner import MODEL_NAME, Simulation, final_parameters, open_run_models
from shoal.simulation.unlearning import _enroll_if_new

ROUNDS = 6
CLIENTS = 12


def job(*overrides: str) -> Config:
    return bare_config(
        [
            "run.name=forget",
            f"run.rounds={ROUNDS}",
            f"data.num_clients={CLIENTS}",
            "round.clients_per_round=3",
            "round.over_selection=1.0",
            "evaluation.every=2",
            "evaluation.clients=3",
            "simulation.workers=0",
            *overrides,
        ]
    )


def participation(folder: Path) -> dict[str, list[int]]:
    """Each client's fit rounds on the run's lineage, resolved with the run's key."""
    models = open_run_models(folder)
    try:
        head = models.head(MODEL_NAME)
        assert head is not None
        log = ParticipationLog(models.database)
        names = Pseudonyms.in_folder(folder, run_id="forget")
        rounds: dict[str, list[int]] = {}
        for round_number in range(1, head.round + 1):
            for entry in log.round("forget", round_number):
                client = names.resolve(
                    entry.participant, round_number=round_number, candidates=ClientNames(CLIENTS)
                )
                assert client is not None
                rounds.setdefault(client, []).append(round_number)
        return rounds
    finally:
        models.database.close()


def run_without(folder: Path, client_id: str, *overrides: str) -> None:
    """The never-included run: the same job with ``client_id`` retired before round 1."""
    simulation = Simulation(job(*overrides), folder)
    models = open_run_models(folder)
    try:
        clients = ClientRegistry(models.database)
        for name in ClientNames(CLIENTS):
            _enroll_if_new(simulation, clients, name)
        clients.set_status(client_id, ClientStatus.RETIRED, "never included")
    finally:
        models.database.close()
    simulation.run()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unlearning") / "full"
    Simulation(job(), folder).run()
    return folder


def middle_client(rounds: dict[str, list[int]]) -> str:
    """A client whose first participation is in the middle of the run."""
    middle = [client for client, played in sorted(rounds.items()) if 3 <= played[0] <= 4]
    assert middle, rounds
    return middle[0]


def test_the_unlearned_model_is_the_never_included_model_bit_for_bit(
    full_run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "unlearned"
    shutil.copytree(full_run, folder)
    rounds = participation(folder)
    client = middle_client(rounds)
    first = rounds[client][0]
    before = open_run_models(folder)
    old_versions = [record.version for record in before.list(MODEL_NAME)]
    old_head = before.head(MODEL_NAME)
    before.database.close()
    assert old_head is not None

    report = shoal.unlearn(folder, client, actor="alice")

    run_without(tmp_path / "never", client)
    unlearned, never = final_parameters(folder), final_parameters(tmp_path / "never")
    assert np.array_equal(unlearned.vector, never.vector)
    assert unlearned.sha256() == never.sha256() == report.new_head_sha256
    assert unlearned.sha256() != old_head.sha256  # the client did count
    # exactly the rounds from the first that asked it (an evaluation's, or its first
    # participation) on were recomputed
    assert report.first_participation == first
    assert report.participated_rounds == tuple(rounds[client])
    start = min(first, report.first_asked or first)
    assert report.recomputed_rounds == tuple(range(start, ROUNDS + 1))
    assert report.restart_round == start - 1 and report.retrained
    assert report.old_head_version == old_head.version and report.old_head_sha256 == old_head.sha256
    assert report.old_head_accuracy is not None and report.new_head_accuracy is not None
    # the old branch stays, marked BAD; the new branch starts at the restart version
    models = open_run_models(folder)
    try:
        records = {record.version: record for record in models.list(MODEL_NAME)}
        assert set(old_versions) < set(records)
        superseded = [v for v in old_versions if records[v].round >= first]
        assert list(report.superseded_versions) == superseded
        for version in superseded:
            assert records[version].status is ModelStatus.BAD
            assert "unlearning (alice)" in (records[version].status_reason or "")
            assert client not in (records[version].status_reason or "")
        new = [v for v in records if v not in old_versions]
        assert records[new[0]].parent == report.restart_version
        assert ClientRegistry(models.database).get(client).status is ClientStatus.RETIRED
        assert ClientRegistry(models.database).get(client).status_reason == "unlearned by alice"
        (entry,) = AuditLog(models.database).entries(kind="unlearn")
        assert entry.actor == "alice" and entry.subject == client
        pinned = load_public_key(folder / PUBLIC_KEY_FILE)
        assert verify_audit_log(models.database, pinned.verify_audit_head).intact
    finally:
        models.database.close()
    assert client not in participation(folder)
    models = open_run_models(folder)
    try:  # a version that holds the client's updates stays BAD: no mark lifts it
        for status in (ModelStatus.GOOD, ModelStatus.BAD):  # a BAD re-mark took its reason
            with pytest.raises(RegistryError, match="superseded by unlearning: its weights hold"):
                models.mark(MODEL_NAME, superseded[-1], status, reason="oops")
        assert models.get(MODEL_NAME, superseded[-1]).status is ModelStatus.BAD
    finally:
        models.database.close()
    written = json.loads((folder / f"unlearning-{client}.json").read_text())
    assert written["recomputed_rounds"] == list(report.recomputed_rounds)
    assert written["audit"]["kind"] == "unlearn" and written["audit"]["actor"] == "alice"
    # a resume after unlearning finds nothing left to play and keeps the model
    Simulation(job(), folder, resume=True).run()
    assert final_parameters(folder).sha256() == report.new_head_sha256


SURPLUS = ("round.over_selection=1.67", "evaluation.every=1")  # 5 asked for 3; every round


def asked_only(folder: Path) -> dict[str, int]:
    """Clients some round asked and did not count before their first counted round (or
    ever), with that round."""
    models = open_run_models(folder)
    try:
        log = ParticipationLog(models.database)
        names = Pseudonyms.in_folder(folder, run_id="forget")
        asked: dict[str, int] = {}
        for round_number in log.asked_rounds("forget"):  # (resolved here, on their own)
            for client in ClientNames(CLIENTS):
                pseudonym = names.of(client, round_number=round_number)
                if (round_number, pseudonym) in log.asked("forget", [pseudonym]):
                    asked.setdefault(client, round_number)
    finally:
        models.database.close()
    counted = participation(folder)
    return {
        client: first
        for client, first in asked.items()
        if client not in counted or first < counted[client][0]
    }


def test_a_client_asked_and_not_counted_is_unlearned_bit_for_bit(tmp_path: Path) -> None:
    """Over-selection asks more clients than it counts, and an evaluation round asks its
    own: removing a client asked in such a round changes its draw. The restart went before
    its first counted round only, and the model differed from the never-included run."""
    full = tmp_path / "full"
    Simulation(job(*SURPLUS), full).run()
    candidates = sorted(asked_only(full).items(), key=lambda item: item[1])
    assert candidates, "5 asked for 3 a round: some client was asked and not counted first"
    for client, first_asked in candidates[:2]:
        folder = tmp_path / client
        shutil.copytree(full, folder)
        report = shoal.unlearn(folder, client, actor="grace")
        assert report.first_asked == first_asked and report.needs_recomputing
        assert report.restart_round is not None and report.restart_round < first_asked
        run_without(tmp_path / f"never-{client}", client, *SURPLUS)
        never = final_parameters(tmp_path / f"never-{client}").sha256()
        assert report.new_head_sha256 == final_parameters(folder).sha256() == never


def test_a_client_that_never_trained_needs_no_recomputation(full_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "idle"
    shutil.copytree(full_run, folder)
    idle = sorted(set(ClientNames(CLIENTS)) - set(participation(folder)))
    assert idle, "with 3 of 12 clients a round, some client never trains in 6 rounds"
    head = final_parameters(folder).sha256()
    report = shoal.unlearn(folder, idle[0], actor="bob")
    assert report.first_participation is None and not report.needs_recomputing
    assert report.recomputed_rounds == () and report.superseded_versions == ()
    assert report.new_head_sha256 == report.old_head_sha256 == head
    assert final_parameters(folder).sha256() == head


def test_unlearning_twice_is_harmless_and_a_retired_client_stays_retired(
    full_run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "twice"
    shutil.copytree(full_run, folder)
    client = middle_client(participation(folder))
    first = shoal.unlearn(folder, client, actor="carol", retrain=False)
    assert first.needs_recomputing and not first.retrained
    assert first.new_head_version == first.restart_version
    again = shoal.unlearn(folder, client, actor="dave")  # the same report, now retrained
    assert again.retrained and again.old_head_version == first.old_head_version
    assert again.superseded_versions == first.superseded_versions
    assert first.restart_round is not None
    assert again.recomputed_rounds == tuple(range(first.restart_round + 1, ROUNDS + 1))
    thrice = shoal.unlearn(folder, client, actor="erin")  # done: nothing moves
    assert thrice.new_head_sha256 == again.new_head_sha256 == final_parameters(folder).sha256()
    assert thrice.recomputed_rounds == again.recomputed_rounds


def test_unlearning_again_leaves_an_operators_rollback_further_back(
    full_run: Path, tmp_path: Path
) -> None:
    """HEAD moved forward, from the operator's version 0 to the restart version."""
    folder = tmp_path / "further"
    shutil.copytree(full_run, folder)
    client = middle_client(participation(folder))
    first = shoal.unlearn(folder, client, actor="judy", retrain=False)
    assert first.restart_version is not None and first.restart_version > 0
    models = open_run_models(folder)
    try:
        models.rollback(MODEL_NAME, 0, reason="start over")
    finally:
        models.database.close()
    again = shoal.unlearn(folder, client, actor="judy", retrain=False)
    assert again.new_head_version == 0


class Interrupted(Exception):
    pass


def test_an_interrupted_retraining_goes_on_where_it_stopped(full_run: Path, tmp_path: Path) -> None:
    """Unlearning again after its retraining stopped (a kill, an operator's rollback) said
    "nothing to recompute", exited 0 and left HEAD half-trained."""
    folder = tmp_path / "interrupted"
    shutil.copytree(full_run, folder)
    client = middle_client(participation(folder))
    old_head = final_parameters(folder).sha256()

    def stop_after_a_commit(row: dict[str, object]) -> None:
        if row["phase"] == "fit" and row["committed"]:
            raise Interrupted

    with pytest.raises(Interrupted):
        shoal.unlearn(folder, client, actor="frank", on_round=stop_after_a_commit)
    report = shoal.unlearn(folder, client, actor="frank")
    run_without(tmp_path / "never", client)
    assert report.retrained and report.old_head_sha256 == old_head
    assert report.new_head_sha256 == final_parameters(tmp_path / "never").sha256()
    assert report.restart_round is not None
    assert report.recomputed_rounds == tuple(range(report.restart_round + 1, ROUNDS + 1))
    models = open_run_models(folder)
    try:
        rollbacks = AuditLog(models.database).entries(kind="rollback")
    finally:
        models.database.close()
    assert len(rollbacks) == 1  # the retraining went on; it did not start over


def test_unknown_client_and_folder_without_a_run(full_run: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no client 'client-99999'"):
        shoal.unlearn(full_run, "client-99999", actor="eve")
    with pytest.raises(RunError, match="not a Shoal run folder"):
        shoal.unlearn(tmp_path, "client-00001", actor="eve")


def test_unlearning_refuses_a_run_folder_another_process_runs(
    full_run: Path, tmp_path: Path
) -> None:
    """As on a deployment: a resume of the run holds its folder, and unlearning, which moves
    its HEAD, refuses at once instead of racing it."""
    folder = tmp_path / "busy"
    shutil.copytree(full_run, folder)
    client = middle_client(participation(folder))
    head = final_parameters(folder).sha256()
    with (
        hold_folder(folder, what="run folder"),  # the resume's hold
        pytest.raises(RunError, match="is in use by another shoal process"),
    ):
        shoal.unlearn(folder, client, actor="frank", retrain=False)
    assert final_parameters(folder).sha256() == head  # nothing moved


def test_a_retraining_whose_every_round_aborts_says_so_and_what_to_do(tmp_path: Path) -> None:
    """Three clients, all of them in every round at quorum 1: without one, no round can
    commit. The unlearning ended with HEAD at version 0 and nothing in its report said so."""
    folder = tmp_path / "run"
    everyone = ["data.num_clients=3", "round.quorum=1.0", "evaluation.every=0"]
    Simulation(job(*everyone), folder).run()
    report = shoal.unlearn(folder, "client-00001", actor="grace")
    assert report.recomputed_rounds and report.new_head_version == report.restart_version
    assert report.next_step is not None
    assert report.next_step.startswith("every recomputed round aborted (")
    assert "the quorum" in report.next_step and "--resume" in report.next_step


def test_a_version_bad_already_is_superseded_for_good_too(full_run: Path, tmp_path: Path) -> None:
    """A version the playbook had marked BAD kept only that reason, and a mark lifted it."""
    folder = tmp_path / "playbook-bad"
    shutil.copytree(full_run, folder)
    client = middle_client(participation(folder))
    models = open_run_models(folder)
    try:
        head = models.head(MODEL_NAME)
        assert head is not None
        models.mark(MODEL_NAME, head.version, ModelStatus.BAD, reason="playbook: loss")
    finally:
        models.database.close()
    report = shoal.unlearn(folder, client, actor="heidi", retrain=False)
    assert head.version in report.superseded_versions
    models = open_run_models(folder)
    try:
        reason = models.get(MODEL_NAME, head.version).status_reason or ""
        assert reason.startswith("superseded by unlearning (heidi)")
        assert reason.endswith("BAD before: playbook: loss")
        with pytest.raises(RegistryError, match="superseded by unlearning"):
            models.mark(MODEL_NAME, head.version, ModelStatus.GOOD, reason="lift")
    finally:
        models.database.close()


def test_a_run_without_pseudonyms_unlearns_bit_for_bit(tmp_path: Path) -> None:
    """Stored under the plain id, one name for every round: the lookup kept one round per name,
    found none of the client's but its last, and said there was nothing to recompute."""
    plain = ("metadata.pseudonyms=false",)
    full = tmp_path / "full"
    Simulation(job(*plain), full).run()
    models = open_run_models(full)
    try:
        log = ParticipationLog(models.database)
        rounds: dict[str, list[int]] = {}
        for round_number in range(1, ROUNDS + 1):
            for entry in log.round("forget", round_number):
                rounds.setdefault(entry.participant, []).append(round_number)
    finally:
        models.database.close()
    client = next(c for c, played in sorted(rounds.items()) if len(played) >= 2)
    report = shoal.unlearn(full, client, actor="ivan")
    assert report.participated_rounds == tuple(rounds[client])
    run_without(tmp_path / "never", client, *plain)
    assert report.new_head_sha256 == final_parameters(tmp_path / "never").sha256()
