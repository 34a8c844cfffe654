"""``shoal attest``: release keys, the manifest step and the allow-list, as operators run them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.governance import CodeMeasurer, SignedManifest, load_release_public_key
from shoal.registry import AllowedBuilds, BuildState, open_database
from support.attestation import APP_SOURCE, Release


def shoal(*args: str | Path) -> Result:
    runner = CliRunner(env={"COLUMNS": "200", "USER": "ana"})
    return runner.invoke(app, [str(arg) for arg in args])


def shoal_json(*args: str | Path) -> Any:
    result = shoal(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_error_line(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Release]:
    made = Release.make(tmp_path / "release")
    yield made
    made.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "coordinator-state"


def test_keygen_writes_a_pem_pair_and_never_overwrites(tmp_path: Path) -> None:
    result = shoal("attest", "keygen", "--out", tmp_path / "acme")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "acme.key").stat().st_mode & 0o777 == 0o600
    raw = load_release_public_key(tmp_path / "acme.pub")
    assert raw.hex() not in result.stdout  # the fingerprint, not the key
    assert "release key " in result.stdout
    again = shoal("attest", "keygen", "--out", tmp_path / "acme")
    assert "never overwritten" in one_error_line(again, code=2)


def test_the_manifest_step_signs_what_is_installed_for_a_users_app(
    tmp_path: Path, release: Release
) -> None:
    # the app next to the job's config, found the way `shoal client run --config` finds it
    job = tmp_path / "job"
    job.mkdir()
    module = f"{release.module}_beside_config"
    (job / f"{module}.py").write_text(APP_SOURCE)
    (job / "job.toml").write_text(f'[app]\nclient = "{module}:client_fn"\n')
    out = tmp_path / "client.manifest.json"
    fields = shoal_json(
        "attest", "manifest",
        "--release-key", release.folder / "release.key",
        "--config", job / "job.toml",
        "--label", "v1.2",
        "--out", out,
    )  # fmt: skip
    signed = SignedManifest.read(out)
    signed.verify()
    assert fields["manifest_id"] == signed.manifest_id
    assert fields["app"] == f"{module}:client_fn" == signed.statement.app
    assert fields["label"] == "v1.2"
    measured = CodeMeasurer().measure(f"{module}:client_fn")
    assert fields["app_sha256"] == measured["app"].sha256
    assert fields["shoal_sha256"] == measured["shoal"].sha256
    assert signed.release_key == load_release_public_key(release.public_key)


def test_the_manifest_step_refuses_what_it_cannot_measure_or_sign(
    tmp_path: Path, release: Release
) -> None:
    out = tmp_path / "m.json"
    missing = shoal(
        "attest", "manifest", "--release-key", release.folder / "release.key",
        "--app", "no_such_app_module:client_fn", "--out", out,
    )  # fmt: skip
    assert "cannot find the app module 'no_such_app_module'" in one_error_line(missing, 2)
    wrong_key = shoal(
        "attest", "manifest", "--release-key", release.public_key,
        "--app", release.app, "--out", out,
    )  # fmt: skip
    assert "not an unencrypted PEM private key" in one_error_line(wrong_key, 2)
    assert not out.exists()


def manifest_file(tmp_path: Path, release: Release, *, label: str = "v1") -> Path:
    path = tmp_path / f"manifest-{label}.json"
    path.write_text(release.manifest(label=label).to_json())
    return path


def test_allow_list_and_revoke_keep_who_when_and_why(
    tmp_path: Path, release: Release, state: Path
) -> None:
    path = manifest_file(tmp_path, release)
    manifest_id = SignedManifest.read(path).manifest_id
    allowed = shoal_json(
        "attest", "allow", path, "--reason", "QA passed", "--state-dir", state
    )  # fmt: skip
    assert allowed["build_id"] == manifest_id
    assert (allowed["kind"], allowed["state"]) == ("manifest", "ALLOWED")
    assert (allowed["allowed_by"], allowed["allowed_reason"]) == ("ana", "QA passed")
    assert release.app in allowed["label"] and "v1" in allowed["label"]
    other = shoal_json(
        "attest", "allow", "enclave-42", "--kind", "tee-quote", "--by", "bo",
        "--reason", "audited", "--state-dir", state,
    )  # fmt: skip
    assert (other["kind"], other["allowed_by"], other["label"]) == ("tee-quote", "bo", "")

    table = shoal("attest", "list", "--state-dir", state)
    assert table.exit_code == 0, table.output
    assert manifest_id[:16] in table.stdout and "QA passed" in table.stdout

    revoked = shoal_json(
        "attest", "revoke", manifest_id[:12], "--reason", "CVE-2026-7", "--by", "cy",
        "--state-dir", state,
    )  # fmt: skip
    assert (revoked["state"], revoked["revoked_by"], revoked["revoked_reason"]) == (
        "REVOKED",
        "cy",
        "CVE-2026-7",
    )
    listed = shoal_json("attest", "list", "--state-dir", state)
    assert [(row["build_id"], row["state"]) for row in listed] == [
        (manifest_id, "REVOKED"),
        ("enclave-42", "ALLOWED"),
    ]
    again = shoal("attest", "allow", path, "--reason", "try again", "--state-dir", state)
    assert "a revocation is final" in one_error_line(again)
    database = open_database(None, folder=state / "registry")
    try:
        entry = AllowedBuilds(database).get(manifest_id)
        assert entry is not None and entry.state is BuildState.REVOKED
    finally:
        database.close()


def test_allow_refuses_an_altered_manifest_and_a_bare_id_without_a_kind(
    tmp_path: Path, release: Release, state: Path
) -> None:
    path = manifest_file(tmp_path, release)
    document = json.loads(path.read_text())
    document["statement"]["label"] = "promoted to v2"
    path.write_text(json.dumps(document))
    altered = shoal("attest", "allow", path, "--reason", "r", "--state-dir", state)
    assert "does not verify" in one_error_line(altered)
    bare = shoal("attest", "allow", "3f" * 32, "--reason", "r", "--state-dir", state)
    assert "give --kind with a build id" in one_error_line(bare, 2)
    kind = shoal(
        "attest", "allow", "x1", "--kind", "Play Integrity", "--reason", "r", "--state-dir", state
    )
    assert "attestation kind" in one_error_line(kind, 2)
    empty_reason = shoal("attest", "allow", path, "--reason", " ", "--state-dir", state)
    assert empty_reason.exit_code == 2 and "give a reason" in empty_reason.stderr


def test_list_and_revoke_on_an_empty_or_missing_registry(tmp_path: Path, state: Path) -> None:
    missing = shoal("attest", "list", "--state-dir", tmp_path / "no-such-state")
    assert missing.exit_code == 1
    shoal("clients", "enroll", "--state-dir", state)  # creates the registry
    assert shoal_json("attest", "list", "--state-dir", state) == []
    empty = shoal("attest", "list", "--state-dir", state)
    assert "no build is allowed" in empty.stdout
    unknown = shoal("attest", "revoke", "3f3f3f3f3f", "--reason", "r", "--state-dir", state)
    assert "no allowed build '3f3f3f3f3f'" in one_error_line(unknown)


def test_client_run_refuses_a_manifest_of_another_app(tmp_path: Path, release: Release) -> None:
    path = manifest_file(tmp_path, release)
    result = shoal(
        "client", "run", "--coordinator", "127.0.0.1:1", "--state-dir", tmp_path / "client",
        "--insecure", "--manifest", path,
    )  # fmt: skip
    line = one_error_line(result, 2)
    assert f"is the manifest of {release.app}, not of shoal.apps.builtin:client_app" in line
