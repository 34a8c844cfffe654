"""Rounds played again after HEAD moved back spend privacy again; a crash's retry does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import shoal
from shoal.config import Config, parse_config
from shoal.coordinator.records import RunRecords
from shoal.governance.pseudonyms import Pseudonyms
from shoal.privacy.accounting import PrivacyAccountant
from shoal.registry.participation import ParticipationLog
from shoal.registry.privacy import PrivacyLedger
from shoal.simulation.population import ClientNames
from shoal.simulation.runner import MODEL_NAME, Simulation, open_run_models

pytestmark = pytest.mark.filterwarnings("ignore::shoal.privacy.noise.InsecureNoiseWarning")

ROUNDS = 5
COHORT = 5
CLIENTS = 20
JOB: dict[str, Any] = {
    "run": {"name": "replay", "rounds": ROUNDS, "seed": 3},
    "data": {"num_clients": CLIENTS},
    "round": {"clients_per_round": COHORT, "over_selection": 1.0},
    "evaluation": {"every": 0},
    "simulation": {"workers": 0},
    "privacy": {"placement": "central", "noise_multiplier": 1.0, "secure_noise": False},
}


def job() -> Config:
    return parse_config(JOB)


def fit_rows(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [row for row in rows if row["phase"] == "fit" and row["committed"]]


def accounted(rows: list[dict[str, Any]]) -> float:
    """The epsilon of these released rounds, composed independently of the run's books."""
    accountant = PrivacyAccountant(method="rdp", sampling="fixed", conversion="improved")
    for row in rows:
        population = row["population"]
        accountant.compose(
            noise_multiplier=row["noise_multiplier"],
            sample_size=min(COHORT, population),
            population=population,
        )
    return accountant.epsilon(delta=rows[0]["delta"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("replay") / "full"
    Simulation(job(), folder).run()
    return folder


def ledger_keys(folder: Path) -> list[tuple[int, int]]:
    models = open_run_models(folder)
    try:
        return [
            (entry.attempt, entry.round)
            for entry in PrivacyLedger(models.database).rounds("replay")
        ]
    finally:
        models.database.close()


def test_a_rollback_and_resume_spends_the_replayed_rounds_again(
    full_run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "rolled-back"
    shutil.copytree(full_run, folder)
    released = fit_rows(folder)
    before = json.loads((folder / "summary.json").read_text())["epsilon"]
    assert before == pytest.approx(accounted(released), rel=1e-9)
    models = open_run_models(folder)
    try:  # what `shoal models rollback` does: HEAD back to round 2's version
        (version,) = [r.version for r in models.list(MODEL_NAME) if r.round == 2]
        models.rollback(MODEL_NAME, version)
    finally:
        models.database.close()
    summary = Simulation(job(), folder, resume=True).run()
    replayed = fit_rows(folder)[2:]  # the rows kept from before HEAD, then the replays
    assert [row["round"] for row in replayed] == [3, 4, 5]
    assert summary["epsilon"] == pytest.approx(accounted(released + replayed), rel=1e-9)
    assert summary["epsilon"] > before
    assert ledger_keys(folder) == [*((0, r) for r in range(1, 6)), (1, 3), (1, 4), (1, 5)]
    assert [row["privacy_attempt"] for row in replayed] == [1, 1, 1]


def test_a_crash_between_the_ledgers_record_and_the_commit_is_not_spent_twice(
    full_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "crashed"
    commit = RunRecords.commit

    def crash_at_round_3(self: RunRecords, parameters: Any, **fields: Any) -> Any:
        if fields["round_number"] == 3:
            raise RuntimeError("the coordinator died before committing round 3")
        return commit(self, parameters, **fields)

    monkeypatch.setattr(RunRecords, "commit", crash_at_round_3)
    with pytest.raises(RuntimeError, match="died before committing round 3"):
        Simulation(job(), folder).run()
    assert ledger_keys(folder)[-1] == (0, 3)  # recorded, never released
    monkeypatch.setattr(RunRecords, "commit", commit)
    summary = Simulation(job(), folder, resume=True).run()
    whole = json.loads((full_run / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(whole["epsilon"], rel=1e-12)
    assert ledger_keys(folder) == [(0, r) for r in range(1, 6)]
    assert summary["model_sha256"] == whole["model_sha256"]


def test_unlearning_spends_the_recomputed_rounds_on_top(full_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "unlearned"
    shutil.copytree(full_run, folder)
    released = fit_rows(folder)
    before = json.loads((folder / "summary.json").read_text())["epsilon"]
    client = _client_first_seen_in_round(folder, 3)
    report = shoal.unlearn(folder, client, actor="alice")
    assert report.recomputed_rounds == (3, 4, 5)
    replayed = [row for row in fit_rows(folder) if row["round"] >= 3]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(accounted(released + replayed), rel=1e-9)
    assert summary["epsilon"] > before
    assert report.privacy_note is not None and "spent again on top" in report.privacy_note


def _client_first_seen_in_round(folder: Path, round_number: int) -> str:
    """A client whose first fit round is ``round_number``, resolved with the run's key."""
    names = Pseudonyms.in_folder(folder, run_id="replay")
    models = open_run_models(folder)
    try:
        log = ParticipationLog(models.database)
        played: dict[int, set[str]] = {}
        for number in range(1, round_number + 1):
            for entry in log.round("replay", number):
                client = names.resolve(
                    entry.participant, round_number=number, candidates=ClientNames(CLIENTS)
                )
                assert client is not None
                played.setdefault(number, set()).add(client)
    finally:
        models.database.close()
    earlier = set().union(*(played.get(number, set()) for number in range(1, round_number)))
    fresh = sorted(played[round_number] - earlier)
    assert fresh, f"no client first trains in round {round_number}: change the seed"
    return fresh[0]
