"""What the registries record in the audit log, each in the transaction of its change: a
bulk enrollment as one entry, status changes, commits, verdicts, rollbacks, policy denials,
budget locks (on SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shoal.core import Parameters
from shoal.core.device import DeviceState
from shoal.core.errors import RegistryError
from shoal.registry import (
    AuditLog,
    BlobStore,
    ClientRegistry,
    ClientStatus,
    Database,
    DecisionRecord,
    ModelRegistry,
    ModelStatus,
    PolicyDecisionLog,
    PrivacyLedger,
)


def kinds(database: Database) -> list[str]:
    return [entry.kind for entry in AuditLog(database).entries()]


def test_enrollments_and_status_changes_are_audited(database: Database) -> None:
    clients = ClientRegistry(database, audit=AuditLog(database, actor="alice"))
    clients.enroll("c-1", DeviceState())
    clients.enroll("c-1", DeviceState())  # a refresh enrolls nobody new: no entry
    assert clients.enroll_population({f"c-{i}": DeviceState() for i in range(5)}) == 4
    assert clients.enroll_population({"c-1": DeviceState()}) == 0  # nothing new, no entry
    clients.set_status("c-2", ClientStatus.SUSPENDED, "diverged")
    clients.set_status("c-2", ClientStatus.ACTIVE)
    clients.set_status("c-3", ClientStatus.RETIRED, "unlearned")
    entries = AuditLog(database).entries()
    assert [e.kind for e in entries] == ["enroll", "enroll", "suspend", "reinstate", "retire"]
    assert entries[1].details == {"count": 4, "clients": ["c-0", "c-2", "c-3", "c-4"]}
    assert entries[2].subject == "c-2" and entries[2].details["reason"] == "diverged"
    assert {entry.actor for entry in entries} == {"alice"}


def test_a_refused_change_leaves_no_entry(database: Database) -> None:
    clients = ClientRegistry(database)
    clients.enroll("c-1", DeviceState())
    clients.set_status("c-1", ClientStatus.RETIRED)
    with pytest.raises(RegistryError):
        clients.set_status("c-1", ClientStatus.ACTIVE)
    assert kinds(database) == ["enroll", "retire"]


def test_commits_verdicts_and_rollbacks_are_audited(database: Database, tmp_path: Path) -> None:
    models = ModelRegistry(database, BlobStore(tmp_path / "blobs"))
    for value in range(3):
        models.commit(
            "m",
            Parameters.from_arrays([np.full(2, value, np.float32)]),
            round=value,
            architecture_version="v1",
        )
    models.mark("m", 2, ModelStatus.BAD, reason="accuracy dropped 30 points")
    models.rollback("m", 1)
    entries = AuditLog(database).entries()
    assert [e.kind for e in entries] == ["commit"] * 3 + ["mark", "rollback"]
    assert (
        entries[2].subject == "m@v2" and entries[2].details["sha256"] == models.get("m", 2).sha256
    )
    assert entries[3].details == {
        "from": "CANDIDATE",
        "to": "BAD",
        "reason": "accuracy dropped 30 points",
    }
    assert entries[4].details["from_version"] == 2 and entries[4].details["to_version"] == 1
    with pytest.raises(RegistryError):
        models.rollback("m", 2)  # BAD: refused, not audited
    assert len(AuditLog(database).entries()) == 5


def test_policy_denials_are_audited_in_one_batch(database: Database) -> None:
    log = PolicyDecisionLog(database)
    records = [
        DecisionRecord(run_id="r", round=3, client_id="c-1", allowed=True, facts={}),
        DecisionRecord(
            run_id="r",
            round=3,
            client_id="c-2",
            allowed=False,
            reasons=(("norm", "10x the median"),),
            facts={"l2_norm": float("inf")},
        ),
    ]
    log.record(records)
    (entry,) = AuditLog(database).entries()
    assert (entry.kind, entry.subject) == ("policy_deny", "c-2")
    assert entry.details == {
        "run_id": "r",
        "round": 3,
        "reasons": [{"code": "norm", "detail": "10x the median"}],
    }


def test_budget_opening_and_locking_are_audited(database: Database) -> None:
    ledger = PrivacyLedger(database)
    ledger.open_budget("r", epsilon=1.0, delta=1e-5)
    ledger.lock("r", reason="operator stop")
    ledger.lock("r", reason="again")  # the first lock stands: no second entry
    entries = AuditLog(database).entries()
    assert [e.kind for e in entries] == ["budget_open", "budget_lock"]
    assert entries[1].details["reason"] == "operator stop"
