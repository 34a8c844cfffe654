"""An operator's rollback while the run runs: the run's next commit is refused, not a lie.

Reproduced before the fix: ``shoal models rollback global 1`` while a run was at round 2
moved HEAD, and the run's round 3 was committed on top of version 1 (its parent in the
registry) though its weights were trained from version 2, the version the rollback took
out: the poisoned model went on under a lineage that said it was gone. Now the commit
checks that HEAD is still the version the round was trained from; the run stops with one
error, nothing of the round committed, and a restart retrains from the operator's HEAD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shoal.core.errors import RunError
from shoal.simulation import Simulation
from shoal.simulation.runner import MODEL_NAME, open_run_models
from support.jobs import bare_config

TINY = [
    "run.rounds=4",
    "data.num_clients=6",
    "round.clients_per_round=3",
    "evaluation.every=0",
    "simulation.workers=0",
    "report.enabled=false",
]


def test_a_rollback_while_the_run_runs_stops_it_before_a_lying_commit(tmp_path: Path) -> None:
    folder = tmp_path / "run"

    def roll_back_after_round_two(row: dict[str, Any]) -> None:
        if row["round"] == 2 and row["phase"] == "fit":
            models = open_run_models(folder)  # as `shoal models rollback` opens it
            try:
                models.rollback(MODEL_NAME, 1, reason="round 2 looked poisoned")
            finally:
                models.database.close()

    with pytest.raises(RunError) as stopped:
        Simulation(bare_config(TINY), folder).run(on_round=roll_back_after_round_two)
    message = str(stopped.value)
    assert "HEAD moved to version 1 outside this run" in message
    assert "trained round 3 from version 2" in message and "\n" not in message
    models = open_run_models(folder)
    try:
        versions = models.list(MODEL_NAME)
        assert [record.version for record in versions] == [0, 1, 2]  # round 3: nothing
        assert models.head(MODEL_NAME).version == 1  # type: ignore[union-attr]
    finally:
        models.database.close()

    summary = Simulation(
        bare_config(TINY), folder, resume=True
    ).run()  # the operator's HEAD, retrained on
    assert summary["rounds_completed"] == 4
    models = open_run_models(folder)
    try:
        head = models.head(MODEL_NAME)
        assert head is not None
        lineage = []
        record = head
        while record.parent is not None:
            lineage.append(record.version)
            record = models.get(MODEL_NAME, record.parent)
        assert 2 not in lineage  # the version rolled back is no ancestor of HEAD
    finally:
        models.database.close()
