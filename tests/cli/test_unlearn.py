"""``shoal unlearn CLIENT``: the report printed, the retraining done, and one-line mistakes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.support.jobs import bare_config
from tests.support.user_errors import EXIT_CONFIG, invoke, one_line_error

from shoal.governance.pseudonyms import Pseudonyms
from shoal.registry.participation import ParticipationLog
from shoal.simulation.population import ClientNames
from shoal.simulation.runner import Simulation, final_parameters, open_run_models


def first_in_round_two(folder: Path) -> str:
    """A client whose first fit round was round 2 (found with the run's pseudonym key)."""
    models = open_run_models(folder)
    try:
        log = ParticipationLog(models.database)
        names = Pseudonyms.in_folder(folder, run_id="shoal")
        seen = {
            names.resolve(entry.participant, round_number=1, candidates=ClientNames(8))
            for entry in log.round("shoal", 1)
        }
        second = {
            names.resolve(entry.participant, round_number=2, candidates=ClientNames(8))
            for entry in log.round("shoal", 2)
        }
    finally:
        models.database.close()
    fresh = sorted(client for client in second - seen if client is not None)
    assert fresh, "round 2 drew only clients of round 1: pick another seed"
    return fresh[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli-unlearn") / "run"
    config = bare_config(
        [
            "run.rounds=3",
            "data.num_clients=8",
            "round.clients_per_round=2",
            "round.over_selection=1.0",
            "evaluation.every=0",
            "simulation.workers=0",
        ]
    )
    Simulation(config, folder).run()
    return folder


def test_unlearn_prints_the_report_and_retrains(run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(run_dir, folder)
    before = final_parameters(folder).sha256()
    client = first_in_round_two(folder)
    first = invoke("unlearn", client, "--out", folder, "--actor", "alice", "--json")
    assert first.exit_code == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["first_participation"] == 2
    assert report["recomputed_rounds"] == [2, 3] and report["actor"] == "alice"
    assert report["old_head_sha256"] == before != report["new_head_sha256"]
    assert final_parameters(folder).sha256() == report["new_head_sha256"]
    again = invoke("unlearn", client, "--out", folder, "--json")  # done: the same report
    assert again.exit_code == 0, again.stderr
    repeated = json.loads(again.stdout)
    for key in ("old_head_sha256", "new_head_sha256", "recomputed_rounds", "first_participation"):
        assert repeated[key] == report[key]
    assert final_parameters(folder).sha256() == report["new_head_sha256"]


def test_mistakes_are_one_line(run_dir: Path, tmp_path: Path) -> None:
    one_line_error(
        invoke("unlearn", "client-00099", "--out", run_dir),
        code=1,
        contains=("has no client 'client-00099'",),
    )
    one_line_error(
        invoke("unlearn", "client-00001", "--out", tmp_path),
        code=1,
        contains=("not a Shoal run folder",),
    )
    one_line_error(
        invoke("unlearn", "client-00001", "--state-dir", tmp_path),
        code=1,
        contains=("holds no coordinator run",),
    )
    one_line_error(invoke("unlearn", "client-00001"), code=EXIT_CONFIG, contains=("--out",))
    one_line_error(
        invoke("unlearn", "client-00001", "--out", run_dir, "--state-dir", tmp_path),
        code=EXIT_CONFIG,
        contains=("either",),
    )
