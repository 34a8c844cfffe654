"""A round's records are one registry transaction: the policy's decisions on its updates, its
version, the audit log's selection and commit entries, the signed head and the participants
commit together, or none of them does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shoal.core.errors import RegistryError
from shoal.governance.model_signing import PUBLIC_KEY_FILE, load_public_key
from shoal.registry import PolicyDecisionLog, verify_audit_log
from shoal.registry.audit import AuditLog
from shoal.registry.participation import ParticipationLog
from shoal.simulation.runner import MODEL_NAME, Simulation, open_run_models
from support.jobs import bare_config

SMALL = [
    "data.num_clients=8",
    "round.clients_per_round=4",
    "round.over_selection=1.0",
    "evaluation.every=0",
    "simulation.workers=0",
]


def test_a_failure_inside_a_round_s_records_leaves_none_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ParticipationLog.record

    def fails_in_round_two(self: ParticipationLog, entries: Any, **kwargs: Any) -> Any:
        if entries and entries[0].round == 2:
            raise RegistryError("the disk is full")
        return real(self, entries, **kwargs)

    monkeypatch.setattr(ParticipationLog, "record", fails_in_round_two)
    with pytest.raises(RegistryError, match="disk is full"):
        Simulation(bare_config([*SMALL, "run.rounds=3"]), tmp_path).run()
    models = open_run_models(tmp_path)
    try:
        assert [record.round for record in models.list(MODEL_NAME)] == [0, 1]
        entries = AuditLog(models.database).entries()
        assert {entry.subject for entry in entries if entry.kind == "select"} == {"round 1"}
        (commit,) = [
            entry for entry in entries if entry.kind == "commit" and "@v1" in entry.subject
        ]
        head = AuditLog(models.database).heads()[-1]
        assert head.seq >= commit.seq  # round 1's commit was signed in its own transaction
        decided = PolicyDecisionLog(models.database).decisions("shoal")
        assert sorted({decision.round for decision in decided}) == [1]  # round 2's rolled back
        assert len(decided) == 4
    finally:
        models.database.close()

    monkeypatch.setattr(ParticipationLog, "record", real)
    summary = Simulation(bare_config([*SMALL, "run.rounds=3"]), tmp_path, resume=True).run()
    assert summary["rounds_completed"] == 3
    models = open_run_models(tmp_path)
    try:
        pinned = load_public_key(tmp_path / PUBLIC_KEY_FILE)
        assert verify_audit_log(models.database, pinned.verify_audit_head).intact
        assert [record.round for record in models.list(MODEL_NAME)] == [0, 1, 2, 3]
        decided = PolicyDecisionLog(models.database).decisions("shoal")
        assert [decision.round for decision in decided] == [1] * 4 + [2] * 4 + [3] * 4
    finally:
        models.database.close()
