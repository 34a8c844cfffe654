"""The operator commands as a user runs them, on a state folder filled through the registry API."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from typer.testing import CliRunner, Result

from shoal.cli import app, models, operator
from shoal.core import DeviceState, Parameters, SecurityError
from shoal.registry import (
    BlobStore,
    ClientRegistry,
    ClientStatus,
    EnrollmentTokens,
    ModelRegistry,
    ModelStatus,
    open_database,
)

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)


@dataclass
class State:
    """A coordinator state folder and the registries inside it."""

    folder: Path
    models: ModelRegistry
    clients: ClientRegistry
    tokens: EnrollmentTokens


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    """Model ``digits`` at versions 0-3 (1 marked BAD, HEAD at 3) and three clients."""
    folder = tmp_path / "coordinator-state"
    database = open_database(None, folder=folder / "registry")
    models = ModelRegistry(database, BlobStore(folder / "blobs"))
    for version in range(4):
        models.commit(
            "digits",
            Parameters.from_arrays([np.full(3, float(version))], names=["w"]),
            round=version * 2,
            architecture_version="mlp-v1",
            metrics={"accuracy": 0.5 + version / 10, "loss": 1.0 - version / 10, "clients": 8},
            now=NOW + timedelta(minutes=version),
        )
    models.mark("digits", 1, ModelStatus.BAD)
    models.mark("digits", 2, ModelStatus.GOOD)
    clients = ClientRegistry(database, seed=0)
    for client_id, device_class in (
        ("phone-a", "phone"),
        ("phone-b", "phone"),
        ("srv-1", "server"),
    ):
        clients.enroll(client_id, DeviceState(device_class=device_class), now=NOW)
    try:
        yield State(folder, models, clients, EnrollmentTokens(database))
    finally:
        database.close()


def shoal(*args: str | Path, input: str | None = None) -> Result:
    runner = CliRunner(env={"COLUMNS": "200"})  # a wide terminal: no cell is cut short
    return runner.invoke(app, [str(arg) for arg in args], input=input)


def shoal_json(*args: str | Path) -> Any:
    result = shoal(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # nothing but the JSON on stdout


def one_error_line(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# --- models ------------------------------------------------------------------------------


def test_models_list_shows_every_version_and_marks_head(state: State) -> None:
    rows = shoal_json("models", "list", "--state-dir", state.folder)
    assert [(row["version"], row["head"]) for row in rows] == [
        (0, False),
        (1, False),
        (2, False),
        (3, True),
    ]
    assert [row["status"] for row in rows] == ["CANDIDATE", "BAD", "GOOD", "CANDIDATE"]
    assert [row["parent"] for row in rows] == [None, 0, 1, 2]
    assert rows[3]["metrics"] == {"accuracy": 0.8, "loss": 0.7, "clients": 8}
    assert rows[0]["created_at"] == NOW.isoformat()
    assert rows[3]["sha256"] == state.models.get("digits", 3).sha256
    table = shoal("models", "list", "--state-dir", state.folder, "--name", "digits")
    assert table.exit_code == 0
    assert table.stdout.startswith("versions of model digits")  # one model: named once
    head_lines = [line for line in table.stdout.splitlines() if "HEAD" in line]
    assert len(head_lines) == 1 and "accuracy=0.8" in head_lines[0]


def test_an_empty_registry_lists_nothing(tmp_path: Path) -> None:
    open_database(None, folder=tmp_path / "registry").close()
    assert shoal_json("models", "list", "--state-dir", tmp_path) == []
    assert shoal_json("clients", "list", "--state-dir", tmp_path) == []
    assert "no model versions" in shoal("models", "list", "--state-dir", tmp_path).stdout


def test_models_show_gives_every_field(state: State) -> None:
    shown = shoal_json("models", "show", "digits", "2", "--state-dir", state.folder)
    record = state.models.get("digits", 2)
    assert shown["sha256"] == record.sha256
    assert shown["blob"] == record.blob
    assert (shown["round"], shown["parent"], shown["status"]) == (4, 1, "GOOD")
    assert shown["architecture_version"] == "mlp-v1"
    assert shown["head"] is False
    table = shoal("models", "show", "digits", "2", "--state-dir", state.folder)
    assert table.exit_code == 0
    assert "metrics.accuracy" in table.stdout and record.sha256[:12] in table.stdout


def test_rollback_moves_head_and_keeps_later_versions(state: State) -> None:
    moved = shoal_json("models", "rollback", "digits", "2", "--yes", "--state-dir", state.folder)
    assert (moved["version"], moved["head"], moved["previous_head"]) == (2, True, 3)
    head = state.models.head("digits")
    assert head is not None and head.version == 2
    rows = shoal_json("models", "list", "--state-dir", state.folder)
    assert [row["version"] for row in rows if row["head"]] == [2]
    assert len(rows) == 4
    text = shoal("models", "rollback", "digits", "0", "-y", "--state-dir", state.folder)
    assert text.exit_code == 0 and "version 2 -> version 0" in text.stdout


def test_rollback_refuses_a_bad_version(state: State) -> None:
    result = shoal("models", "rollback", "digits", "1", "--yes", "--state-dir", state.folder)
    assert "marked BAD" in one_error_line(result)
    assert state.models.head("digits").version == 3  # type: ignore[union-attr]


def test_rollback_refuses_a_corrupt_blob(state: State) -> None:
    blob = state.models.blobs.path(state.models.get("digits", 0).blob)
    Path(blob).write_bytes(b"not the weights")
    result = shoal("models", "rollback", "digits", "0", "--yes", "--state-dir", state.folder)
    assert "corrupt" in one_error_line(result)
    assert state.models.head("digits").version == 3  # type: ignore[union-attr]


def test_rollback_reads_the_blobs_given(state: State, tmp_path: Path) -> None:
    args = ("models", "rollback", "digits", "0", "--yes", "--state-dir", state.folder)
    assert "no blob" in one_error_line(shoal(*args, "--blobs", tmp_path / "empty"))
    assert shoal(*args, "--blobs", f"file://{state.folder / 'blobs'}").exit_code == 0


def test_rollback_needs_yes_without_a_terminal(state: State) -> None:
    result = shoal("models", "rollback", "digits", "0", "--state-dir", state.folder)
    assert result.exit_code == 2
    assert "--yes" in result.stderr
    assert state.models.head("digits").version == 3  # type: ignore[union-attr]


def test_rollback_asks_on_a_terminal(state: State, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_interactive", lambda: True)
    args = ("models", "rollback", "digits", "0", "--state-dir", state.folder)
    declined = shoal(*args, input="n\n")
    assert declined.exit_code == 1
    assert "from version 3 to version 0?" in declined.stderr
    assert state.models.head("digits").version == 3  # type: ignore[union-attr]
    assert shoal(*args, input="y\n").exit_code == 0
    assert state.models.head("digits").version == 0  # type: ignore[union-attr]


def test_rollback_to_head_changes_nothing(state: State) -> None:
    result = shoal("models", "rollback", "digits", "3", "--state-dir", state.folder)
    assert result.exit_code == 0  # nothing to confirm
    assert "already version 3" in result.stdout


# --- clients -----------------------------------------------------------------------------


def test_clients_list_filters(state: State) -> None:
    listed = shoal_json("clients", "list", "--state-dir", state.folder)
    assert [row["client_id"] for row in listed] == ["phone-a", "phone-b", "srv-1"]
    assert listed[2]["status"] == "ACTIVE" and listed[2]["device_class"] == "server"
    assert listed[0]["last_seen"] == NOW.isoformat()
    phones = shoal_json("clients", "list", "--device-class", "phone", "--state-dir", state.folder)
    assert [row["client_id"] for row in phones] == ["phone-a", "phone-b"]
    first = shoal_json("clients", "list", "--limit", "1", "--state-dir", state.folder)
    assert [row["client_id"] for row in first] == ["phone-a"]
    table = shoal("clients", "list", "--state-dir", state.folder)
    assert table.exit_code == 0 and "srv-1" in table.stdout


def test_suspend_and_resume_are_visible(state: State) -> None:
    folder = ("--state-dir", state.folder)
    suspended = shoal_json("clients", "suspend", "phone-b", "--reason", "stolen", *folder)
    assert (suspended["status"], suspended["status_reason"]) == ("SUSPENDED", "stolen")
    assert state.clients.get("phone-b").status is ClientStatus.SUSPENDED
    listed = shoal_json("clients", "list", "--status", "suspended", *folder)
    assert [row["client_id"] for row in listed] == ["phone-b"]
    shown = shoal_json("clients", "show", "phone-b", *folder)
    assert shown["status"] == "SUSPENDED"
    resumed = shoal_json("clients", "resume", "phone-b", *folder)
    assert (resumed["status"], resumed["status_reason"]) == ("ACTIVE", None)
    assert shoal_json("clients", "list", "--status", "SUSPENDED", *folder) == []


def test_facts_a_client_did_not_report_show_as_unknown(state: State) -> None:
    phone = DeviceState(
        device_class="phone", battery_level=0.42, charging=False, wifi=True, ram_gb=3.5, idle=True
    )
    state.clients.enroll("phone-c", phone, now=NOW)
    rows = {
        row["client_id"]: row for row in shoal_json("clients", "list", "--state-dir", state.folder)
    }
    facts = ("battery_level", "charging", "wifi", "idle", "ram_gb")
    assert [rows["srv-1"][fact] for fact in facts] == [None] * 5
    assert [rows["phone-c"][fact] for fact in facts] == [0.42, False, True, True, 3.5]
    table = shoal("clients", "list", "--state-dir", state.folder).stdout.splitlines()
    server = next(line for line in table if "srv-1" in line)
    assert server.count("unknown") == 5 and "100%" not in server and "yes" in server
    known = next(line for line in table if "phone-c" in line)
    assert "unknown" not in known and "42%" in known and "3.5" in known
    shown = shoal("clients", "show", "srv-1", "--state-dir", state.folder).stdout
    for fact in ("battery_level", "idle"):
        assert [line.split()[-2] for line in shown.splitlines() if fact in line] == ["unknown"]


@pytest.mark.parametrize("status", [ClientStatus.SUSPENDED, ClientStatus.RETIRED])
def test_a_barred_client_never_shows_can_train_yes(state: State, status: ClientStatus) -> None:
    state.clients.set_status("phone-a", status, "stolen")
    shown = shoal_json("clients", "show", "phone-a", "--state-dir", state.folder)
    reason = f"client is {status.value.lower()}: stolen"
    assert (shown["can_train"], shown["rejection_reason"]) == (False, reason)
    listed = shoal_json("clients", "list", "--state-dir", state.folder)
    assert [row["can_train"] for row in listed] == [False, True, True]
    table = shoal("clients", "list", "--state-dir", state.folder).stdout
    row = next(line for line in table.splitlines() if "phone-a" in line)
    assert f"no: {reason}" in row and "yes" not in row
    text = shoal("clients", "show", "phone-a", "--state-dir", state.folder).stdout
    assert "True" not in text


def test_tables_show_text_as_it_is(state: State) -> None:
    """A device class or reason that looks like rich markup is printed, not interpreted.

    (A client id cannot: its characters are letters, digits, '.', '_' and '-'.)
    """
    state.clients.enroll("odd-1", DeviceState(device_class="[red]odd[/]"), now=NOW)
    state.clients.set_status("odd-1", ClientStatus.SUSPENDED, "[/x] stolen")
    listed = shoal("clients", "list", "--state-dir", state.folder)
    assert listed.exit_code == 0, listed.output
    assert "[red]odd[/]" in listed.stdout
    shown = shoal("clients", "show", "odd-1", "--state-dir", state.folder)
    assert shown.exit_code == 0, shown.output
    assert "[/x] stolen" in shown.stdout and "[red]odd[/]" in shown.stdout


def test_a_silo_is_named_as_a_client_id(tmp_path: Path) -> None:
    """A silo enrolls under its name: the key holder's commands refuse one no client could use."""
    keys = tmp_path / "silos.json"
    result = shoal("keyholder", "silo-keys", "--out", keys, "--silo", "bank a")
    assert result.exit_code == 2 and "a client id is 1 to 128 ASCII" in result.output
    assert not keys.exists()
    result = shoal("keyholder", "init", "--dir", tmp_path / "kh", "-k", "2", "--silo", "../x=00")
    assert result.exit_code == 2 and "a client id is 1 to 128 ASCII" in result.output
    # one key per silo: a second entry would have replaced the first's key in the file
    result = shoal("keyholder", "silo-keys", "--out", keys, "--silo", "a", "--silo", "a")
    assert result.exit_code == 2 and "silo 'a' is given twice" in result.output
    assert not keys.exists()


@pytest.mark.parametrize("command", ["show", "suspend", "resume"])
@pytest.mark.parametrize("client_id", ["../../etc/passwd", "'; DROP TABLE clients; --", "a\x00b"])
def test_a_client_id_the_registry_would_refuse_is_one_line(
    state: State, command: str, client_id: str
) -> None:
    extra = ["--reason", "why"] if command == "suspend" else []
    result = shoal("clients", command, client_id, *extra, "--state-dir", state.folder)
    assert result.exit_code == 2
    assert "a client id is 1 to 128 ASCII letters" in result.output
    assert "Traceback" not in result.output


def test_a_retired_client_cannot_resume(state: State) -> None:
    state.clients.set_status("srv-1", ClientStatus.RETIRED, "decommissioned")
    result = shoal("clients", "resume", "srv-1", "--state-dir", state.folder)
    assert "RETIRED" in one_error_line(result)


@pytest.mark.parametrize(
    "args",
    [
        ("models", "show", "digits", "99"),
        ("models", "show", "nope", "0"),
        ("models", "list", "--name", "nope"),
        ("models", "rollback", "digits", "99", "--yes"),
        ("clients", "show", "nope"),
        ("clients", "suspend", "nope", "--reason", "x"),
        ("clients", "resume", "nope"),
    ],
)
def test_unknown_ids_are_one_line_and_exit_1(state: State, args: tuple[str, ...]) -> None:
    message = one_error_line(shoal(*args, "--state-dir", state.folder))
    assert "nope" in message or "99" in message


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("clients", "list", "--status", "BOGUS"), "--status"),
        (("clients", "list", "--limit", "0"), "--limit"),
        (("clients", "suspend", "phone-a", "--reason", " "), "--reason"),
        (("clients", "suspend", "phone-a"), "--reason"),
        (("models", "show", "digits", "--", "-1"), "VERSION"),
        (("models", "show", "digits", "one"), "VERSION"),
        (("clients", "enroll", "--expires-in", "7x"), "--expires-in"),
        (("clients", "enroll", "--expires-in", "0d"), "--expires-in"),
        (("clients", "enroll", "--uses", "0"), "--uses"),
        (("clients", "enroll", "--mtls", "--id", "c1"), "--mtls"),
        (("clients", "enroll", "--out", "somewhere"), "--ca-dir/--out"),
    ],
)
def test_bad_option_values_exit_2(state: State, args: tuple[str, ...], named: str) -> None:
    result = shoal(*args[:2], "--state-dir", state.folder, *args[2:])
    assert result.exit_code == 2, result.output
    assert named in result.stderr
    assert state.tokens.list() == []
    assert state.clients.get("phone-a").status is ClientStatus.ACTIVE


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (("--days", "0"), 2, "--days"),
        (("--host", "a b"), 2, "not a host name or IP address: 'a b'"),
        (("--host", ""), 2, "not a host name or IP address: ''"),  # a cryptography traceback
        (("--host", "-a"), 2, "not a host name or IP address: '-a'"),
        (("--host", "localhost", "--host", "a..b"), 2, "'a..b'"),  # checked before any key
        ((), 2, "--out"),
    ],
)
def test_bad_certs_options(tmp_path: Path, args: tuple[str, ...], code: int, named: str) -> None:
    out = () if not args else ("--out", tmp_path / "certs")
    result = shoal("certs", "init", *out, *args)
    assert result.exit_code == code, result.output
    assert named in result.stderr
    assert not (tmp_path / "certs" / "ca.key").exists()


def test_a_missing_registry_is_not_created(tmp_path: Path) -> None:
    message = one_error_line(shoal("clients", "list", "--state-dir", tmp_path / "typo"))
    assert "no registry database" in message
    assert not (tmp_path / "typo").exists()


def test_registry_url_overrides_the_state_folder(state: State, tmp_path: Path) -> None:
    url = f"sqlite:///{state.folder / 'registry' / 'registry.db'}"
    listed = shoal_json("clients", "list", "--registry", url, "--state-dir", tmp_path / "x")
    assert len(listed) == 3


# --- enrollment and certificates ---------------------------------------------------------


def test_enroll_prints_a_token_that_redeems_once(state: State) -> None:
    issued = shoal_json("clients", "enroll", "--expires-in", "1d12h", "--state-dir", state.folder)
    assert issued["client_id"] is None and issued["certificate"] is None
    expires_at = datetime.fromisoformat(issued["expires_at"])
    assert timedelta(hours=35) < expires_at - datetime.now(UTC) <= timedelta(hours=36)
    record = state.tokens.redeem(issued["token"], client_id="phone-c")
    assert (record.token_id, record.uses_left) == (issued["token_id"], 0)
    with pytest.raises(SecurityError, match="used up"):
        state.tokens.redeem(issued["token"], client_id="phone-d")


def test_enroll_binds_the_token_to_an_id(state: State) -> None:
    result = shoal("clients", "enroll", "--id", "srv-2", "--uses", "2", "--state-dir", state.folder)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    token = lines[lines.index(next(line for line in lines if "enrollment token" in line)) + 1]
    assert "srv-2" in result.stdout
    with pytest.raises(SecurityError, match="bound to another client"):
        state.tokens.redeem(token, client_id="srv-3")
    assert state.tokens.redeem(token, client_id="srv-2").uses_left == 1


def test_certs_init_writes_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    made = shoal_json("certs", "init", "--out", out, "--host", "fl.example.com", "--days", "30")
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert made["ca_sha256"] == ca.fingerprint(hashes.SHA256()).hex()
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.com"]
    assert {Path(made[key]).name for key in made if key.endswith(("_key", "_certificate"))} == {
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "model-signing.key",  # the coordinator signs model versions with it
        "model-signing.pub",  # clients pin it beside ca.pem
    }
    before = (out / "ca.pem").read_bytes()
    assert "refusing to overwrite" in one_error_line(shoal("certs", "init", "--out", out))
    assert (out / "ca.pem").read_bytes() == before
    forced = shoal("certs", "init", "--out", out, "--force")
    assert forced.exit_code == 0 and "CA fingerprint (SHA-256): " in forced.stdout
    assert (out / "ca.pem").read_bytes() != before


def test_enroll_with_mtls_issues_a_client_certificate(state: State, tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "certs", tmp_path / "hospital-7"
    assert shoal("certs", "init", "--out", ca_dir).exit_code == 0
    issued = shoal_json(
        "clients", "enroll", "--id", "hospital-7", "--mtls", "--ca-dir", ca_dir, "--out", out,
        "--state-dir", state.folder,
    )  # fmt: skip
    assert issued["certificate"]["ca"] == str(out / "ca.pem")
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    client = x509.load_pem_x509_certificate((out / "client.pem").read_bytes())
    client.verify_directly_issued_by(ca)
    assert client.subject.rfc4514_string() == "CN=hospital-7"
    assert (out / "client.key").stat().st_mode & 0o077 == 0
    assert state.tokens.redeem(issued["token"], client_id="hospital-7").uses_left == 0


def test_enroll_with_mtls_and_no_ca_writes_no_token(state: State, tmp_path: Path) -> None:
    result = shoal(
        "clients", "enroll", "--id", "c1", "--mtls", "--ca-dir", tmp_path / "none",
        "--out", tmp_path / "c1", "--state-dir", state.folder,
    )  # fmt: skip
    one_error_line(result)
    assert state.tokens.list() == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2W", timedelta(weeks=2)),
        ("1d12h", timedelta(hours=36)),
        ("45s", timedelta(seconds=45)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert operator.parse_duration(text) == expected


def test_the_real_entry_point(state: State) -> None:
    """``python -m shoal``: the commands are registered and errors stay one line."""
    command = [sys.executable, "-m", "shoal", "clients"]
    listed = subprocess.run(
        [*command, "list", "--json", "--state-dir", str(state.folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 3
    missing = subprocess.run(
        [*command, "show", "nope", "--state-dir", str(state.folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: no client 'nope' is enrolled"


def test_an_error_that_looks_like_markup_is_printed_as_it_is(state: State) -> None:
    line = one_error_line(shoal("models", "show", "[/x]", "1", "--state-dir", state.folder))
    assert "[/x]" in line
