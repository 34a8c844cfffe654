"""``shoal audit show|verify`` on a real simulated run folder: it verifies; a one-byte edit of
any entry, made with raw SQL on the SQLite file, fails naming that entry; operator commands
record who ran them."""

from __future__ import annotations

import getpass
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.registry.audit import GENESIS_HASH, entry_hash
from shoal.simulation import Simulation
from support.jobs import bare_config

COLUMNS = ("seq", "recorded_at", "kind", "actor", "subject", "details", "prev_hash", "hash")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "run"
    overrides = ["run.rounds=2", "data.num_clients=4", "round.clients_per_round=4"]
    Simulation(bare_config([*overrides, "simulation.workers=0"]), out).run()
    return out


@pytest.fixture
def run(simulated: Path, tmp_path: Path) -> Path:
    """A copy of the simulated run folder, this test's to tamper with."""
    return Path(shutil.copytree(simulated, tmp_path / "run"))


def shoal(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(arg) for arg in args])


def entries(run: Path, *args: str) -> list[dict[str, object]]:
    result = shoal("audit", "show", "--json", "--state-dir", run, *args)
    assert result.exit_code == 0, result.output
    listed: list[dict[str, object]] = json.loads(result.stdout)
    return listed


def test_a_simulated_run_is_audited_and_verifies(run: Path) -> None:
    listed = entries(run)
    kinds = [entry["kind"] for entry in listed]
    assert kinds[:2] == ["commit", "enroll"]  # version 0, then the fleet (one entry)
    assert kinds.count("select") == 2 and kinds.count("commit") == 3
    assert {entry["actor"] for entry in listed} == {"simulator"}
    first = listed[1]["details"]
    assert isinstance(first, dict) and first["count"] == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["audit_seq"] == len(listed) and summary["audit_hash"] == listed[-1]["hash"]
    result = shoal("audit", "verify", "--state-dir", run)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"audit log intact: {len(listed)} entries, head signed at seq {len(listed)}"
    )
    table = shoal("audit", "show", "--state-dir", run, "--kind", "commit", "--limit", "1")
    assert table.exit_code == 0 and "commit" in table.stdout and "global@v0" in table.stdout


def _edited(value: object) -> object:
    if isinstance(value, int):
        return value ^ 0x100
    text = str(value)
    middle = len(text) // 2
    return text[:middle] + ("x" if text[middle] != "x" else "y") + text[middle + 1 :]


@pytest.mark.parametrize("column", COLUMNS)
def test_a_one_byte_edit_of_any_entry_fails_verify_naming_it(run: Path, column: str) -> None:
    with sqlite3.connect(run / "registry" / "registry.db") as connection:
        total = connection.execute("SELECT count(*) FROM audit_log").fetchone()[0]
        for seq in (2, total):  # an entry in the middle, and the last (signed) one
            rowid, value = connection.execute(
                f"SELECT rowid, {column} FROM audit_log WHERE seq = ?", (seq,)
            ).fetchone()
            edit = f"UPDATE audit_log SET {column} = ? WHERE rowid = ?"
            connection.execute(edit, (_edited(value), rowid))
            connection.commit()
            result = shoal("audit", "verify", "--state-dir", run)
            assert result.exit_code == 1, result.output
            assert result.stdout.startswith(f"audit log TAMPERED: entry {seq} "), result.stdout
            connection.execute(edit, (value, rowid))  # put back: the next edit is alone
            connection.commit()


@pytest.mark.parametrize(
    ("edit", "found"),
    [
        (  # another model's weights under HEAD, its sha256 too, signature kept
            "UPDATE model_versions SET sha256 = '{other_sha}', blob = '{other_blob}' "
            "WHERE version = 2",
            "global version 2's sha256 is '{other_sha}'; its commit entry records",
        ),
        (  # HEAD moved with no rollback on record
            "UPDATE model_heads SET version = 1",
            "HEAD of global is version 1; this entry moved it to version 2",
        ),
        (  # a better accuracy for HEAD
            "UPDATE model_versions SET metrics = json_set(metrics, '$.loss', 0.001) "
            "WHERE version = 2",
            "global version 2's metrics are not those it committed",
        ),
        (
            "UPDATE model_versions SET status = 'BAD' WHERE version = 1",
            "global version 1 is BAD; its last entry made it",
        ),
        ("DELETE FROM model_versions WHERE version = 1", "global version 1 is gone"),
        (  # a version slipped in with no commit entry
            "INSERT INTO model_versions SELECT {copy_of_2_as_3} FROM model_versions "
            "WHERE version = 2",
            "global version 3 has no commit entry",
        ),
    ],
)
def test_a_registry_edit_the_log_contradicts_fails_verify(run: Path, edit: str, found: str) -> None:
    """What a registry writer without the key changes beside an intact log: the log said
    intact, and models verify (over the row's own sha256) said valid for all but the first."""
    with sqlite3.connect(run / "registry" / "registry.db") as connection:
        other_sha, other_blob = connection.execute(
            "SELECT sha256, blob FROM model_versions WHERE version = 0"
        ).fetchone()
        columns = [row[1] for row in connection.execute("PRAGMA table_info(model_versions)")]
        as_3 = {"version": "3", "round": "round + 1", "parent": "2"}
        copy = ", ".join(as_3.get(column, column) for column in columns)
        facts = {"other_sha": other_sha, "other_blob": other_blob, "copy_of_2_as_3": copy}
        connection.execute(edit.format(**facts))
        connection.commit()
    result = shoal("audit", "verify", "--state-dir", run)
    assert result.exit_code == 1, result.output
    line = result.stdout.strip()
    assert line.startswith("audit log TAMPERED: entry ") and " contradicted: " in line, line
    assert found.format(**facts) in line, line


def test_operator_commands_record_who_ran_them(run: Path) -> None:
    marked = shoal(
        "models",
        "mark",
        "global",
        "1",
        "bad",
        "--reason",
        "poisoned",
        "--state-dir",
        run,
        "--actor",
        "alice",
    )
    assert marked.exit_code == 0, marked.output
    rolled = shoal("models", "rollback", "global", "0", "--yes", "--state-dir", run)
    assert rolled.exit_code == 0, rolled.output
    # the run's playbook marked each version GOOD before: the operator's verdicts come last
    mark, rollback = entries(run, "--kind", "mark")[-1], entries(run, "--kind", "rollback")[-1]
    assert (mark["actor"], mark["subject"]) == ("alice", "global@v1")
    assert mark["details"] == {"from": "GOOD", "to": "BAD", "reason": "poisoned"}
    assert rollback["actor"] == getpass.getuser()
    assert rollback["details"] == {
        "from_version": 2,
        "to_version": 0,
        "reason": None,
        "sha256": entries(run, "--kind", "commit")[0]["details"]["sha256"],  # type: ignore[index]
    }
    verified = shoal("audit", "verify", "--state-dir", run, "--json")
    report = json.loads(verified.stdout)
    assert verified.exit_code == 0 and report["uncovered"] == 2  # no key signs an operator's


def test_deleting_the_signed_heads_and_rehashing_a_forged_log_fails_verify(run: Path) -> None:
    """The attacker with write access to the database: it forges an entry, rehashes the whole
    chain so that every link holds, and deletes the heads whose signatures would betray it."""
    with sqlite3.connect(run / "registry" / "registry.db") as connection:
        rows = connection.execute(
            "SELECT seq, recorded_at, kind, actor, subject, details FROM audit_log ORDER BY seq"
        ).fetchall()
        previous = GENESIS_HASH
        for seq, recorded_at, kind, actor, subject, details in rows:
            if seq == 1:
                actor = "someone-else"  # the forgery
            digest = entry_hash(
                seq=seq,
                recorded_at=recorded_at,
                kind=kind,
                actor=actor,
                subject=subject,
                details=json.loads(details),
                prev_hash=previous,
            )
            connection.execute(
                "UPDATE audit_log SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (actor, previous, digest, seq),
            )
            previous = digest
        connection.execute("DELETE FROM audit_heads")
        connection.commit()
    result = shoal("audit", "verify", "--state-dir", run)
    assert result.exit_code == 1, result.output
    assert "a model commit no signed head covers" in result.stdout, result.stdout
