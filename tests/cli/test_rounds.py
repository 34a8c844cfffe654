"""``shoal rounds list|show`` on a poisoned run folder, and each playbook step by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.governance.pseudonyms import PSEUDONYM_KEY_FILE
from shoal.simulation.runner import MODEL_NAME, Simulation
from support.boosting_app import ATTACKERS, POISONED_FROM, poisoned_job


def shoal(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "220"}).invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose round 4 was poisoned, rolled back and its attackers suspended."""
    folder = tmp_path_factory.mktemp("run")
    Simulation(poisoned_job(rounds=POISONED_FROM), folder).run()
    return folder


def test_list_shows_each_round_and_the_verdicts(run: Path) -> None:
    result = shoal("rounds", "list", "--state-dir", run)
    assert result.exit_code == 0, result.output
    assert "bad, HEAD back to 3" in result.output
    listed = json.loads(shoal("rounds", "list", "--state-dir", run, "--json").output)
    assert [row["round"] for row in listed] == [1, 2, 3, 4]
    assert listed[-1]["playbook"]["verdict"] == "bad"


def test_show_gives_the_row_the_participants_and_the_decisions(run: Path) -> None:
    result = shoal("rounds", "show", str(POISONED_FROM), "--state-dir", run, "--json")
    assert result.exit_code == 0, result.output
    shown: dict[str, Any] = json.loads(result.output)
    assert shown["run_id"] == "poisoned"
    assert shown["rows"][0]["playbook"]["rolled_back_to"] == 3
    participants = shown["participants"]
    assert len(participants) == shown["rows"][0]["reported"]
    assert all(entry["participant"].startswith("p-") for entry in participants)  # pseudonyms
    assert "client_id" not in participants[0]  # nobody resolved without --resolve
    flagged = [entry for entry in participants if entry["flagged"]]
    assert flagged and all(entry["z_score"] > 3.5 for entry in flagged)
    assert len(shown["decisions"]) == len(participants)  # the policy decided on each update
    table = shoal("rounds", "show", str(POISONED_FROM), "--state-dir", run)
    assert table.exit_code == 0, table.output
    assert "participants" in table.output and "policy decisions" in table.output


def test_resolve_names_the_flagged_clients_with_the_key(run: Path) -> None:
    args = ("rounds", "show", str(POISONED_FROM), "--state-dir", run, "--json", "--resolve")
    shown = json.loads(shoal(*args).output)
    flagged = {entry["client_id"] for entry in shown["participants"] if entry["flagged"]}
    assert flagged and flagged <= set(ATTACKERS)
    assert all(entry["client_id"] for entry in shown["participants"])
    assert {d["client_id"] for d in shown["decisions"]} == {
        e["client_id"] for e in shown["participants"]
    }


def test_resolve_is_refused_without_the_key(run: Path, tmp_path: Path) -> None:
    key = run / PSEUDONYM_KEY_FILE
    hidden = tmp_path / "key"
    os.replace(key, hidden)
    try:
        result = shoal("rounds", "show", "1", "--state-dir", run, "--resolve")
    finally:
        os.replace(hidden, key)
    assert result.exit_code == 2
    assert "pseudonym.key" in result.output


def test_an_unknown_round_or_folder_is_one_line(run: Path, tmp_path: Path) -> None:
    missing = shoal("rounds", "show", "99", "--state-dir", run)
    assert missing.exit_code == 1 and "no round 99" in missing.output
    empty = shoal("rounds", "list", "--state-dir", tmp_path)
    assert empty.exit_code == 1 and "metrics.jsonl" in empty.output


def test_another_runs_id_gets_none_of_this_folders_rows(run: Path) -> None:
    """The folder's metrics are its own run's: they were shown under any --run-id given."""
    other = shoal("rounds", "show", "1", "--state-dir", run, "--run-id", "another-run")
    assert other.exit_code == 1 and "run 'another-run' has no round 1" in other.output
    own = shoal("rounds", "show", "1", "--state-dir", run, "--json")
    assert own.exit_code == 0 and json.loads(own.stdout)["rows"]


def test_each_playbook_step_by_hand(run: Path) -> None:
    """An operator marks round 3's version BAD, rolls back with a reason, suspends a client."""
    state = ("--state-dir", run, "--actor", "oncall")
    marked = shoal("models", "mark", MODEL_NAME, "3", "bad", "--reason", "poisoned", *state)
    assert marked.exit_code == 0, marked.output
    back = shoal(
        "models", "rollback", MODEL_NAME, "2", "--yes", "--reason", "round 3 poisoned", *state
    )
    assert back.exit_code == 0, back.output
    suspended = shoal("clients", "suspend", ATTACKERS[0], "--reason", "round 3", *state)
    assert suspended.exit_code == 0, suspended.output
    audit = json.loads(shoal("audit", "show", "--state-dir", run, "--json").output)
    rollbacks = [entry for entry in audit if entry["kind"] == "rollback"]
    assert rollbacks[-1]["details"]["reason"] == "round 3 poisoned"
    assert rollbacks[-1]["actor"] == "oncall"
    assert shoal("audit", "verify", "--state-dir", run).exit_code == 0
