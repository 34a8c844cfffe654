"""The audit log: appends chain, heads are signed, and every tampering with the stored rows is
caught, with the first bad entry named (on SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from shoal.core.errors import RegistryError
from shoal.core.parameters import Parameters
from shoal.governance.model_signing import ModelSigner, PinnedKey, generate_signing_key
from shoal.registry import (
    AuditEvent,
    AuditLog,
    BlobStore,
    Database,
    ModelRegistry,
    ModelStatus,
    audit_verify,
    verify_audit_log,
)
from shoal.registry.audit import GENESIS_HASH, canonical_json, entry_hash
from shoal.registry.schema import audit_heads, audit_log, model_heads, model_versions

KEY = generate_signing_key()
SIGNER = ModelSigner(KEY, run_id="run-1")
PINNED = PinnedKey.of(KEY.public_key())
NOW = datetime(2025, 3, 1, 12, 30, 45, 999_000, tzinfo=UTC)
ENTRIES = 6


def filled(database: Database, *, sign_at: tuple[int, ...] = ()) -> AuditLog:
    """A log of ENTRIES entries, its head signed after each seq in ``sign_at``."""
    log = AuditLog(database)
    for seq in range(1, ENTRIES + 1):
        log.append(
            "mark",
            subject=f"global@v{seq}",
            details={
                "status": "GOOD",
                "reason": f"é round {seq}",
                "metrics": {"b": 1.5, "a": [seq]},
            },
            now=NOW,
        )
        if seq in sign_at:
            log.sign_head(SIGNER.audit_head, now=NOW)
    return log


def verify(database: Database) -> Any:
    return verify_audit_log(database, PINNED.verify_audit_head)


def raw(database: Database, seq: int) -> dict[str, Any]:
    with database.read() as connection:
        row = connection.execute(sa.select(audit_log).where(audit_log.c.seq == seq)).one()
        return dict(row._mapping)


def update(database: Database, at: int, **values: Any) -> None:
    with database.write() as connection:
        connection.execute(sa.update(audit_log).where(audit_log.c.seq == at).values(**values))


def flip(text: str, position: int) -> str:
    """``text`` with one character replaced by another (one byte for ASCII)."""
    old = text[position]
    return text[:position] + ("x" if old != "x" else "y") + text[position + 1 :]


# --- appending ---------------------------------------------------------------------------------


def test_the_empty_log_verifies(database: Database) -> None:
    report = verify(database)
    assert report.intact and report.entries == 0 and report.signed_seq is None
    assert report.line() == "audit log intact: 0 entries, no head signed"
    assert AuditLog(database).sign_head(SIGNER.audit_head) is None  # nothing to sign


def test_entries_chain_and_hash_their_canonical_encoding(database: Database) -> None:
    log = filled(database)
    entries = log.entries()
    assert [entry.seq for entry in entries] == list(range(1, ENTRIES + 1))
    assert entries[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(entries):
        assert after.prev_hash == before.hash
    first = entries[0]
    assert first.recorded_at == 1740832245  # floored to the second
    document = (
        '{"actor":"coordinator","details":{"metrics":{"a":[1],"b":1.5},"reason":"é round 1",'
        f'"status":"GOOD"}},"kind":"mark","prev_hash":"{GENESIS_HASH}","recorded_at":1740832245,'
        '"seq":1,"subject":"global@v1"}'
    )
    assert first.hash == hashlib.sha256(document.encode("utf-8")).hexdigest()
    assert raw(database, 1)["details"] == canonical_json(first.details)


def test_times_are_floored_to_the_granularity(database: Database) -> None:
    entry = AuditLog(database, granularity_s=3600).append("unlearn", subject="c-1", now=NOW)
    assert entry.recorded_at % 3600 == 0 and entry.time == NOW.replace(
        minute=0, second=0, microsecond=0
    )
    with pytest.raises(RegistryError, match="granularity"):
        AuditLog(database, granularity_s=0)


def test_a_batch_is_one_append_and_filters_read_it(database: Database) -> None:
    log = AuditLog(database, actor="simulator")
    events = [AuditEvent(kind="enroll", subject=f"c-{i}") for i in range(3)]
    events.append(AuditEvent(kind="suspend", subject="c-1", actor="alice"))
    entries = log.append_many(events)
    assert [entry.seq for entry in entries] == [1, 2, 3, 4]
    assert [entry.actor for entry in entries] == ["simulator"] * 3 + ["alice"]
    assert [entry.subject for entry in log.entries(kind="enroll", since_seq=1)] == ["c-1", "c-2"]
    assert len(log.entries(limit=2)) == 2
    assert log.append_many([]) == []
    assert verify(database).intact


def test_bad_details_and_names_are_refused(database: Database) -> None:
    log = AuditLog(database)
    with pytest.raises(RegistryError, match="JSON"):
        log.append("mark", details={"x": object()})
    with pytest.raises(RegistryError, match="kind"):
        log.append("")
    entry = log.append("mark", details={"loss": float("nan")})  # kept as text, never NaN
    assert entry.details == {"loss": "nan"}


def test_concurrent_writers_never_fork_the_chain(database: Database) -> None:
    log = AuditLog(database)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for index in range(10):
                log.append("enroll", subject=f"w{worker}-{index}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    report = verify(database)
    assert report.intact and report.entries == 40


def test_heads_are_signed_once_and_cover_what_precedes_them(database: Database) -> None:
    log = filled(database, sign_at=(2, 4))
    again = log.sign_head(SIGNER.audit_head)  # head is seq 6 now
    assert again is not None and again.seq == ENTRIES
    assert log.sign_head(SIGNER.audit_head) == again  # kept, not signed twice
    assert [head.seq for head in log.heads()] == [2, 4, 6]
    report = verify(database)
    assert report.intact and report.signed_seq == ENTRIES and report.uncovered == 0
    assert report.line() == f"audit log intact: {ENTRIES} entries, head signed at seq {ENTRIES}"


def test_entries_after_the_last_signed_head_are_counted_as_uncovered(database: Database) -> None:
    filled(database, sign_at=(4,))
    report = verify(database)
    assert report.intact and report.signed_seq == 4 and report.uncovered == 2
    assert "2 later entries covered by no signature" in report.line()


# --- tampering: each attack is caught, and the first bad entry named ---------------------------

TAMPERED = 3


def _edit_one_byte(column: str, value: Any) -> Any:
    if isinstance(value, int):
        return value ^ 0x100  # one byte of the integer: seq 3 becomes 259
    return flip(value, len(value) // 2)


@pytest.mark.parametrize(
    "column", ["seq", "recorded_at", "kind", "actor", "subject", "details", "prev_hash", "hash"]
)
def test_a_one_byte_edit_of_any_column_is_caught(database: Database, column: str) -> None:
    filled(database, sign_at=(ENTRIES,))
    value = raw(database, TAMPERED)[column]
    update(database, TAMPERED, **{column: _edit_one_byte(column, value)})
    problem = verify(database).problem
    assert problem is not None and problem.seq == TAMPERED and problem.kind == "edited"


def test_whitespace_in_the_details_is_an_edit(database: Database) -> None:
    filled(database)
    details = raw(database, TAMPERED)["details"]
    update(database, TAMPERED, details=details.replace(":", ": ", 1))  # same JSON value
    problem = verify(database).problem
    assert problem is not None and (problem.seq, problem.kind) == (TAMPERED, "edited")


def test_a_deleted_entry_is_caught(database: Database) -> None:
    filled(database)
    with database.write() as connection:
        connection.execute(sa.delete(audit_log).where(audit_log.c.seq == TAMPERED))
    problem = verify(database).problem
    assert problem is not None and (problem.seq, problem.kind) == (TAMPERED, "deleted")


def test_a_deletion_hidden_by_renumbering_is_caught(database: Database) -> None:
    filled(database)
    with database.write() as connection:
        connection.execute(sa.delete(audit_log).where(audit_log.c.seq == TAMPERED))
        for seq in range(TAMPERED + 1, ENTRIES + 1):
            connection.execute(
                sa.update(audit_log).where(audit_log.c.seq == seq).values(seq=seq - 1)
            )
    problem = verify(database).problem
    assert problem is not None and (problem.seq, problem.kind) == (TAMPERED, "deleted")


def test_deleting_the_signed_last_entry_is_caught(database: Database) -> None:
    filled(database, sign_at=(ENTRIES,))
    with database.write() as connection:
        connection.execute(sa.delete(audit_log).where(audit_log.c.seq == ENTRIES))
    problem = verify(database).problem
    assert problem is not None and (problem.seq, problem.kind) == (ENTRIES, "deleted")


def _forged(seq: int, prev_hash: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "seq": seq,
        "recorded_at": 1740832245,
        "kind": "mark",
        "actor": "coordinator",
        "subject": "global@v99",
        "details": {"status": "GOOD"},
        "prev_hash": prev_hash,
    }
    return fields | {"details": canonical_json(fields["details"]), "hash": entry_hash(**fields)}


def test_an_inserted_entry_is_caught(database: Database) -> None:
    filled(database)
    with database.write() as connection:
        for seq in range(ENTRIES, TAMPERED - 1, -1):  # make room at TAMPERED
            connection.execute(
                sa.update(audit_log).where(audit_log.c.seq == seq).values(seq=seq + 1)
            )
    previous = raw(database, TAMPERED - 1)["hash"]
    with database.write() as connection:
        connection.execute(audit_log.insert().values(_forged(TAMPERED, previous)))
    problem = verify(database).problem
    assert problem is not None and (problem.seq, problem.kind) == (TAMPERED, "inserted")


def test_an_entry_appended_past_the_signed_head_is_only_uncovered(database: Database) -> None:
    filled(database, sign_at=(ENTRIES,))
    last = raw(database, ENTRIES)["hash"]
    with database.write() as connection:
        connection.execute(audit_log.insert().values(_forged(ENTRIES + 1, last)))
    report = verify(database)  # the documented limit: a signature covers what precedes it
    assert report.intact and report.uncovered == 1


@pytest.mark.parametrize("other", [TAMPERED + 1, ENTRIES])
def test_two_swapped_entries_are_caught(database: Database, other: int) -> None:
    filled(database)
    with database.write() as connection:
        for seq, moved in ((TAMPERED, -1), (other, TAMPERED), (-1, other)):
            connection.execute(sa.update(audit_log).where(audit_log.c.seq == seq).values(seq=moved))
    problem = verify(database).problem
    assert problem is not None and (problem.seq, problem.kind) == (TAMPERED, "reordered")


def test_a_rewritten_and_rehashed_log_fails_its_signed_head(database: Database) -> None:
    filled(database, sign_at=(ENTRIES,))
    with database.write() as connection:  # the attacker recomputes every hash after the edit
        rows = [
            dict(row._mapping)
            for row in connection.execute(sa.select(audit_log).order_by(audit_log.c.seq))
        ]
        previous = rows[TAMPERED - 2]["hash"]
        for row in rows[TAMPERED - 1 :]:
            fields = {k: row[k] for k in ("seq", "recorded_at", "kind", "actor", "subject")}
            details = json.loads(row["details"])
            if row["seq"] == TAMPERED:
                details["status"] = "BAD"
            fields |= {"details": details, "prev_hash": previous}
            previous = entry_hash(**fields)
            connection.execute(
                sa.update(audit_log)
                .where(audit_log.c.seq == row["seq"])
                .values(
                    details=canonical_json(details), prev_hash=fields["prev_hash"], hash=previous
                )
            )
    problem = verify(database).problem
    assert problem is not None and (problem.seq, problem.kind) == (ENTRIES, "rewritten")


def test_a_forged_head_signature_is_caught(database: Database) -> None:
    filled(database, sign_at=(2, 5))
    with database.write() as connection:
        signature = connection.execute(
            sa.select(audit_heads.c.signature).where(audit_heads.c.seq == 5)
        ).scalar_one()
        forged = bytes([signature[0] ^ 1]) + bytes(signature[1:])
        connection.execute(
            sa.update(audit_heads).where(audit_heads.c.seq == 5).values(signature=forged)
        )
    report = verify(database)
    assert report.problem is not None and (report.problem.seq, report.problem.kind) == (
        5,
        "bad_signature",
    )
    assert report.signed_seq == 2


def test_a_head_signed_by_another_key_is_caught(database: Database) -> None:
    log = filled(database)
    log.sign_head(ModelSigner(generate_signing_key(), run_id="run-1").audit_head)
    problem = verify(database).problem
    assert (
        problem is not None and problem.kind == "bad_signature" and "pinned key" in problem.detail
    )


def test_the_registry_is_held_against_the_log_on_each_backend(
    database: Database, tmp_path: Path
) -> None:
    """`contradicted`: a version's metrics, sha256 or status, or HEAD, changed beside an
    intact, signed log (PostgreSQL's JSON and enum columns read back as SQLite's do)."""
    models = ModelRegistry(database, BlobStore(str(tmp_path / "blobs")))
    for value in (0.0, 1.0):
        models.commit(
            "net",
            Parameters.from_arrays([np.full(3, value)], names=["w"]),
            round=int(value),
            architecture_version="arch",
            metrics={"loss": 1.5 - value, "fleet": {"p50": [0.1, 0.2]}, "tag": "x"},
        )
    models.mark("net", 1, ModelStatus.GOOD, reason="fine")
    models.audit.sign_head(SIGNER.audit_head, now=NOW)
    assert verify(database).intact
    one = model_versions.c.version == 1
    metrics = {"loss": 0.5, "fleet": {"p50": [0.1, 0.2]}, "tag": "x"}
    edits: list[tuple[Any, Any, str]] = [
        (
            sa.update(model_versions).where(one).values(metrics={**metrics, "loss": 0.001}),
            sa.update(model_versions).where(one).values(metrics=metrics),
            "net version 1's metrics are not those it committed",
        ),
        (
            sa.update(model_versions).where(one).values(status=ModelStatus.CANDIDATE),
            sa.update(model_versions).where(one).values(status=ModelStatus.GOOD),
            "net version 1 is CANDIDATE; its last entry made it GOOD",
        ),
        (
            sa.update(model_heads).values(version=0),
            sa.update(model_heads).values(version=1),
            "HEAD of net is version 0; this entry moved it to version 1",
        ),
    ]
    for edit, undo, found in edits:
        with database.write() as connection:
            connection.execute(edit)
        report = verify(database)
        assert report.problem is not None and report.problem.kind == "contradicted", report
        assert found in report.problem.detail
        with database.write() as connection:  # put back: the next edit is alone
            connection.execute(undo)
        assert verify(database).intact


def test_a_commit_between_the_logs_read_and_the_registrys_is_no_contradiction(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's default isolation gave each statement its own snapshot: a coordinator's
    commit between reading the log and reading the registry read as a version with no commit
    entry (a false alarm of tampering, about 2 verifies in 60 under a committing run)."""
    models = ModelRegistry(database, BlobStore(str(tmp_path / "blobs")))

    def commit(value: float) -> None:  # as the run layer commits: version, entry, signed head
        with database.write():
            models.commit(
                "net",
                Parameters.from_arrays([np.full(3, value)], names=["w"]),
                round=int(value),
                architecture_version="arch",
                metrics={"loss": value},
            )
            models.audit.sign_head(SIGNER.audit_head, now=NOW)

    commit(0.0)
    registry = audit_verify._registry

    def after_a_live_commit(connection: Any) -> Any:
        writer = threading.Thread(target=commit, args=(1.0,))
        writer.start()
        writer.join()
        return registry(connection)

    monkeypatch.setattr(audit_verify, "_registry", after_a_live_commit)
    assert verify(database).intact
    monkeypatch.setattr(audit_verify, "_registry", registry)
    assert verify(database).intact and verify(database).entries == 2
