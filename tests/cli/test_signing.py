"""``shoal models verify``, ``shoal coordinator key`` and the key a client pins, as a user runs
them: a valid version passes in one line; a tampered blob, a missing signature or another key
fails with the reason."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.coordinator.records import AUDIT_ANCHOR_FILE
from shoal.core import Parameters
from shoal.core.errors import SecurityError
from shoal.governance import (
    ModelSigner,
    generate_signing_key,
    load_or_create_signing_key,
    load_public_key,
    write_public_key,
)
from shoal.registry import BlobStore, ModelRegistry, open_database
from shoal.registry.schema import audit_heads, model_versions
from shoal.simulation import Simulation
from support.jobs import bare_config


def weights(value: float) -> Parameters:
    return Parameters.from_arrays([np.full((3, 2), value), np.full(2, value)], names=["w", "b"])


@pytest.fixture
def models(tmp_path: Path) -> Iterator[ModelRegistry]:
    """Model ``net``: versions 0 and 1 signed by the state folder's key, 2 unsigned (HEAD)."""
    state = tmp_path / "state"
    state.mkdir()
    signer = ModelSigner(load_or_create_signing_key(state / "model-signing.key"), run_id="run-1")
    database = open_database(None, folder=state / "registry")
    registry = ModelRegistry(database, BlobStore(state / "blobs"))
    for version in range(3):
        registry.commit(
            "net",
            weights(version),
            round=version,
            architecture_version="v1",
            signer=signer if version < 2 else None,
        )
    try:
        yield registry
    finally:
        database.close()


def shoal(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(arg) for arg in args])


def verify(tmp_path: Path, *args: str | Path) -> Result:
    return shoal("models", "verify", *args, "--state-dir", tmp_path / "state")


def error_line(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_signed_version_verifies_in_one_line(models: ModelRegistry, tmp_path: Path) -> None:
    result = verify(tmp_path, "net", "1")
    assert result.exit_code == 0, result.output
    [line] = result.stdout.strip().splitlines()
    assert line.startswith("net version 1 (round 1, run run-1): signature valid, key ")
    assert weights(1).sha256() in line
    as_json = json.loads(verify(tmp_path, "net", "0", "--json").stdout)
    assert (as_json["version"], as_json["valid"], as_json["run_id"]) == (0, True, "run-1")


def test_an_unsigned_version_fails_with_the_reason(models: ModelRegistry, tmp_path: Path) -> None:
    assert "version 2 of 'net' is not signed" in error_line(verify(tmp_path, "net", "head"))


def test_another_key_fails_with_the_reason(models: ModelRegistry, tmp_path: Path) -> None:
    other = tmp_path / "other.pub"
    write_public_key(other, generate_signing_key().public_key())
    line = error_line(verify(tmp_path, "net", "1", "--public-key", other))
    assert "not by the pinned key" in line


def test_a_tampered_blob_fails(models: ModelRegistry, tmp_path: Path) -> None:
    record = models.get("net", 1)
    Path(models.blobs.path(record.blob)).write_bytes(weights(7).to_bytes())
    assert "tampered blob" in error_line(verify(tmp_path, "net", "1"))


def test_weights_and_recorded_hash_swapped_together_fail_on_the_signature(
    models: ModelRegistry, tmp_path: Path
) -> None:
    """An attacker who rewrites the row to match other weights cannot re-sign them."""
    forged = models.blobs.put(weights(7).to_bytes())
    with models.database.write() as connection:
        connection.execute(
            sa.update(model_versions)
            .where(model_versions.c.name == "net", model_versions.c.version == 1)
            .values(blob=forged, sha256=weights(7).sha256())
        )
    assert "does not match its signature" in error_line(verify(tmp_path, "net", "1"))


def test_a_swapped_round_fails_on_the_signature(models: ModelRegistry, tmp_path: Path) -> None:
    with models.database.write() as connection:
        connection.execute(
            sa.update(model_versions)
            .where(model_versions.c.name == "net", model_versions.c.version == 0)
            .values(round=5)
        )
    assert "does not match its signature" in error_line(verify(tmp_path, "net", "0"))


def test_mistakes_are_one_line(models: ModelRegistry, tmp_path: Path) -> None:
    assert "no version 9" in error_line(verify(tmp_path, "net", "9"))
    bad_version = verify(tmp_path, "net", "x")
    assert bad_version.exit_code == 2 and "neither a version number nor head" in bad_version.stderr
    missing = error_line(verify(tmp_path, "net", "1", "--public-key", tmp_path / "none.pem"), 2)
    assert "cannot read the coordinator key" in missing


def test_a_simulation_run_folder_is_signed_and_verifies(tmp_path: Path) -> None:
    config = bare_config(
        ["run.rounds=2", "data.num_clients=4", "round.clients_per_round=4", "simulation.workers=0"]
    )
    Simulation(config, tmp_path / "run").run()
    key = tmp_path / "run" / "model-signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for version in ("0", "head"):
        result = shoal("models", "verify", "global", version, "--state-dir", tmp_path / "run")
        assert result.exit_code == 0, result.output
        assert "signature valid" in result.stdout
        # signed for the run it is (its run.name, as its records name it), not for the
        # coordinator's default run id: every simulation's versions claimed to be run-1's
        assert f"run {config.run.name})" in result.stdout, result.stdout


def job(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "job.toml"
    path.write_text(f'[coordinator]\nstate_dir = "{tmp_path / "state"}"\n{extra}')
    return path


def test_coordinator_key_prints_and_exports_the_key_serve_signs_with(tmp_path: Path) -> None:
    result = shoal("coordinator", "key", "--config", job(tmp_path), "--out", tmp_path / "pin.pem")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    pinned = load_public_key(tmp_path / "pin.pem")
    assert f"key id {pinned.key_id}" in result.stderr
    kept = load_or_create_signing_key(tmp_path / "state" / "model-signing.key")  # kept, not new
    assert load_public_key(tmp_path / "state" / "model-signing.pub").key_id == pinned.key_id
    assert kept.public_key() == pinned.public_key
    again = json.loads(shoal("coordinator", "key", "--config", job(tmp_path), "--json").stdout)
    assert again["key_id"] == pinned.key_id


def test_the_deployment_key_beside_the_certificates_is_the_one_used(tmp_path: Path) -> None:
    made = shoal("certs", "init", "--out", tmp_path / "certs")
    assert made.exit_code == 0, made.output
    key = tmp_path / "certs" / "model-signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    deployment = load_public_key(tmp_path / "certs" / "model-signing.pub")
    config = job(tmp_path, f'certificates = "{tmp_path / "certs"}"\n')
    result = shoal("coordinator", "key", "--config", config, "--json")
    assert json.loads(result.stdout)["key_id"] == deployment.key_id
    assert not (tmp_path / "state" / "model-signing.key").exists()


def test_a_client_without_a_pinned_key_refuses_to_start(tmp_path: Path) -> None:
    shoal("certs", "init", "--out", tmp_path / "certs")
    (tmp_path / "certs" / "model-signing.pub").unlink()
    result = shoal(
        "client", "run", "--coordinator", "127.0.0.1:9", "--state-dir", tmp_path / "client",
        "--ca", tmp_path / "certs" / "ca.pem",
    )  # fmt: skip
    line = error_line(result, 2)
    assert "--coordinator-key" in line and "--insecure" in line
    assert not (tmp_path / "client").exists()  # refused before anything was made


def test_the_pinned_key_comes_from_the_option_the_config_or_beside_the_ca(tmp_path: Path) -> None:
    from shoal.cli.network import pinned_coordinator_key
    from shoal.core.errors import ConfigError

    shoal("certs", "init", "--out", tmp_path / "certs")
    ca = tmp_path / "certs" / "ca.pem"
    deployment = load_public_key(tmp_path / "certs" / "model-signing.pub")
    other = tmp_path / "other.pub"
    write_public_key(other, generate_signing_key().public_key())
    chosen = load_public_key(other).key_id

    def key_id(option: Path | None, configured: str | None, insecure: bool = False) -> str | None:
        pinned = pinned_coordinator_key(option, configured, ca, insecure)
        return None if pinned is None else pinned.key_id

    assert key_id(other, None) == chosen
    assert key_id(None, str(other)) == chosen  # [client] coordinator_key
    assert key_id(None, None) == deployment.key_id  # beside --ca
    assert pinned_coordinator_key(None, None, None, True) is None  # --insecure only
    with pytest.raises(ConfigError, match="--coordinator-key"):
        pinned_coordinator_key(None, None, None, False)


def test_the_operator_s_key_is_used_and_a_missing_one_is_one_line(tmp_path: Path) -> None:
    from shoal.governance import key_id_of, write_signing_key

    key = generate_signing_key()
    write_signing_key(tmp_path / "operator.key", key)
    config = job(tmp_path, f'signing_key = "{tmp_path / "operator.key"}"\n')
    result = shoal("coordinator", "key", "--config", config, "--json")
    assert json.loads(result.stdout)["key_id"] == key_id_of(key.public_key())
    assert not (tmp_path / "state" / "model-signing.key").exists()
    missing = job(tmp_path, f'signing_key = "{tmp_path / "none.key"}"\n')
    line = error_line(shoal("coordinator", "key", "--config", missing), 2)
    assert "cannot read the model-signing key" in line


RESUMED = ["data.num_clients=4", "round.clients_per_round=4", "simulation.workers=0"]


def _run_of_one_round(folder: Path) -> None:
    Simulation(bare_config([*RESUMED, "run.rounds=1"]), folder).run()


def _edit_head(folder: Path, *, weights_to: float | None, unsign: bool, unsign_all: bool) -> str:
    """What a writer of the registry, without the signing key, does to HEAD (version 1): its
    weights swapped for ``weights_to`` everywhere (blob and sha256), its signature cleared,
    or every signature and signed audit head cleared (a registry before signing looks so)."""
    database = open_database(None, folder=folder / "registry")
    try:
        models = ModelRegistry(database, BlobStore(str(folder / "blobs")))
        head = models.head("global")
        assert head is not None and head.version == 1
        values: dict[str, object] = {}
        if weights_to is not None:
            honest = models.load("global", 1)
            forged = honest.with_vector(np.full_like(honest.vector, weights_to))
            values |= {"blob": models.blobs.put(forged.to_bytes()), "sha256": forged.sha256()}
        if unsign:
            values |= {"signature": None, "signing_key_id": None, "run_id": None}
        with database.write() as connection:
            if values:
                connection.execute(
                    sa.update(model_versions).where(model_versions.c.version == 1).values(values)
                )
            if unsign_all:
                connection.execute(
                    sa.update(model_versions).values(signature=None, signing_key_id=None)
                )
                connection.execute(sa.delete(audit_heads))
        record = models.get("global", 1)
        return record.sha256
    finally:
        database.close()


def test_a_run_resumed_from_a_registry_before_signing_signs_its_head(tmp_path: Path) -> None:
    """A run folder from a Shoal before signing (nothing in it signed, and no anchor of its
    audit log kept beside it): its HEAD is signed when the run resumes, and the versions after
    it are signed as they are committed."""
    _run_of_one_round(tmp_path / "run")
    _edit_head(tmp_path / "run", weights_to=None, unsign=False, unsign_all=True)
    (tmp_path / "run" / AUDIT_ANCHOR_FILE).unlink()  # a Shoal before signing kept none
    unsigned = shoal("models", "verify", "global", "1", "--state-dir", tmp_path / "run")
    assert "is not signed" in error_line(unsigned)
    Simulation(bare_config([*RESUMED, "run.rounds=2"]), tmp_path / "run", resume=True).run()
    for version in ("1", "2"):
        result = shoal("models", "verify", "global", version, "--state-dir", tmp_path / "run")
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("unsign", "unsign_all", "anchored", "refusal"),
    [
        (True, False, False, "version 1 of 'global', HEAD, is not signed, in a registry whose"),
        (False, False, False, "version 1 of 'global' (round 1, run 'shoal', sha256 bbbad9ac491e"),
        (False, False, True, "(its entry 4 is contradicted: global version 1's sha256 is"),
        (True, True, True, "changed outside Shoal (its signatures removed, its HEAD moved, or"),
    ],
)
def test_a_head_forged_in_the_registry_is_never_trained_on_or_signed(
    tmp_path: Path, unsign: bool, unsign_all: bool, anchored: bool, refusal: str
) -> None:
    """A registry writer swaps HEAD's weights (blob and sha256) and clears its signature, as a
    version from before signing looks, or leaves the signature: the resumed run signed the
    forged weights, its next version was signed over them and pinned clients trained on
    them; or it trained on them under a signature that no longer matched. Or the writer
    clears every signature and signed audit head too, as a whole registry from before signing
    looks: the resumed run signed the forged weights as its HEAD. The run folder keeps its
    audit log's last signed head (outside the registry), which the stripped log lacks, and
    against which the forged HEAD is told first; a folder without it (a Shoal before it) is
    refused by HEAD's own signature check."""
    folder = tmp_path / "run"
    _run_of_one_round(folder)
    forged = _edit_head(folder, weights_to=7.0, unsign=unsign, unsign_all=unsign_all)
    if not anchored:
        (folder / AUDIT_ANCHOR_FILE).unlink()
    resumed = Simulation(bare_config([*RESUMED, "run.rounds=2"]), folder, resume=True)
    with pytest.raises(SecurityError) as refused:
        resumed.run()
    assert refusal in str(refused.value)
    database = open_database(None, folder=folder / "registry")
    try:
        versions = ModelRegistry(database, BlobStore(str(folder / "blobs"))).list("global")
    finally:
        database.close()
    assert [record.version for record in versions] == [0, 1]  # nothing trained on it
    head = versions[1]
    assert head.sha256 == forged and (head.signed is None) == unsign  # nor signed
    verified = shoal("models", "verify", "global", "1", "--state-dir", folder)
    assert verified.exit_code != 0


def test_verify_on_a_folder_without_a_registry_says_so_before_the_key(tmp_path: Path) -> None:
    result = shoal("models", "verify", "global", "head", "--state-dir", tmp_path)
    assert result.exit_code != 0
    assert "no registry database at" in result.output  # it asked for model-signing.pub


def test_a_registry_put_back_to_an_older_copy_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A registry writer puts back a copy taken some rounds ago (every signature in it valid):
    the run resumed from the old HEAD and trained those rounds again, silently undoing what
    was done since (an unlearning, a rollback). It is refused, naming the file to remove where
    an operator restored the copy on purpose; removed, the run resumes from the copy."""
    folder = tmp_path / "run"
    _run_of_one_round(folder)
    copy = tmp_path / "copy"
    for part in ("registry", "blobs"):
        shutil.copytree(folder / part, copy / part)
    Simulation(bare_config([*RESUMED, "run.rounds=3"]), folder, resume=True).run()
    for part in ("registry", "blobs"):
        shutil.rmtree(folder / part)
        shutil.copytree(copy / part, folder / part)
    resumed = Simulation(bare_config([*RESUMED, "run.rounds=3"]), folder, resume=True)
    with pytest.raises(SecurityError) as refused:
        resumed.run()
    message = str(refused.value)
    assert "older than this run folder's record of it" in message
    assert str(folder / AUDIT_ANCHOR_FILE) in message
    (folder / AUDIT_ANCHOR_FILE).unlink()  # the operator's restore, on purpose
    played: list[int] = []
    Simulation(bare_config([*RESUMED, "run.rounds=3"]), folder, resume=True).run(
        on_round=lambda row: played.append(row["round"])
    )
    assert played == [2, 3]  # from the copy's HEAD, version 1


def _registry_file(folder: Path) -> Path:
    [path] = [path for path in (folder / "registry").iterdir() if path.suffix == ".db"]
    return path


def _resumed_rounds(folder: Path) -> list[int]:
    played: list[int] = []
    Simulation(bare_config([*RESUMED, "run.rounds=3"]), folder, resume=True).run(
        on_round=lambda row: played.append(row["round"])
    )
    return played


def test_an_older_copy_with_the_anchored_rows_copied_in_is_refused(tmp_path: Path) -> None:
    """An older copy put back with the anchored entry and its signed head copied into it from
    the current registry: the anchor's own rows were all the check read, and the run resumed
    from the old HEAD, playing its rounds again. The whole log must link."""
    folder = tmp_path / "run"
    _run_of_one_round(folder)
    copy = tmp_path / "copy"
    for part in ("registry", "blobs"):
        shutil.copytree(folder / part, copy / part)
    assert _resumed_rounds(folder) == [2, 3]
    seq = json.loads((folder / AUDIT_ANCHOR_FILE).read_text())["seq"]
    with contextlib.closing(sqlite3.connect(_registry_file(folder))) as current:
        entry = current.execute("SELECT * FROM audit_log WHERE seq = ?", (seq,)).fetchone()
        head = current.execute("SELECT * FROM audit_heads WHERE seq = ?", (seq,)).fetchone()
    for part in ("registry", "blobs"):
        shutil.rmtree(folder / part)
        shutil.copytree(copy / part, folder / part)
    with contextlib.closing(sqlite3.connect(_registry_file(folder))) as old, old:
        old.execute(f"INSERT INTO audit_log VALUES ({', '.join('?' * len(entry))})", entry)
        old.execute(f"INSERT INTO audit_heads VALUES ({', '.join('?' * len(head))})", head)
    with pytest.raises(SecurityError, match=r"its entry \d+ is missing or moved"):
        _resumed_rounds(folder)


def test_a_head_moved_back_behind_the_log_s_back_is_refused(tmp_path: Path) -> None:
    """HEAD moved back to an earlier version, every signature and entry left as they were:
    the run resumed from it and played the rounds after it again (an unlearning or a rollback
    since then undone as silently). HEAD must be where the log's last commit put it."""
    folder = tmp_path / "run"
    Simulation(bare_config([*RESUMED, "run.rounds=3"]), folder).run()
    with contextlib.closing(sqlite3.connect(_registry_file(folder))) as registry, registry:
        registry.execute("UPDATE model_heads SET version = 1 WHERE name = 'global'")
    with pytest.raises(SecurityError, match="HEAD of global is version 1; this entry moved it"):
        _resumed_rounds(folder)


def test_a_head_moved_onto_a_bad_version_is_refused_before_the_playbook_rolls_it_back(
    tmp_path: Path,
) -> None:
    """An operator marks an old version BAD; a registry writer then moves HEAD onto it. The
    resume's playbook rolled HEAD back from it (an honest entry of its own, written first),
    and the check after that found a log that agreed: rounds played again. The registry is
    checked before anything is written on it."""
    folder = tmp_path / "run"
    Simulation(bare_config([*RESUMED, "run.rounds=4"]), folder).run()
    marked = shoal("models", "mark", "global", "2", "bad", "--reason", "ops", "--state-dir", folder)
    assert marked.exit_code == 0, marked.output
    with contextlib.closing(sqlite3.connect(_registry_file(folder))) as registry, registry:
        registry.execute("UPDATE model_heads SET version = 2 WHERE name = 'global'")
        rollbacks = registry.execute("SELECT count(*) FROM audit_log WHERE kind = 'rollback'")
        before = rollbacks.fetchone()
    with pytest.raises(SecurityError, match="HEAD of global is version 2; this entry moved it"):
        _resumed_rounds(folder)
    with contextlib.closing(sqlite3.connect(_registry_file(folder))) as registry:
        rollbacks = registry.execute("SELECT count(*) FROM audit_log WHERE kind = 'rollback'")
        assert rollbacks.fetchone() == before  # nothing written on it


def test_a_run_whose_anchor_cannot_be_written_goes_on_and_says_so_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The anchor is a defence, not a record of the run: where it cannot be written (a folder
    in its place, here) the run commits every round, warns at its first try and at its end
    (not at every round), and closes its folder."""
    folder = tmp_path / "run"
    (folder / AUDIT_ANCHOR_FILE).mkdir(parents=True)
    with caplog.at_level("WARNING", logger="shoal.coordinator.records"):
        summary = Simulation(bare_config([*RESUMED, "run.rounds=4"]), folder).run()
    assert summary["rounds_completed"] == 4
    warned = [r for r in caplog.records if "could not keep the audit log's head" in r.message]
    assert len(warned) == 2  # the first commit's, and the close's
    (folder / AUDIT_ANCHOR_FILE).rmdir()
    assert _resumed_rounds(folder) == []  # the folder was let go; nothing is left to play
