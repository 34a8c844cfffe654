"""The policy decision log, on every registry backend: kept, read back, counted, and durable."""

from __future__ import annotations

import pytest

from shoal.core import RegistryError
from shoal.registry import Database, DecisionRecord, PolicyDecisionLog, open_database


def decision(client: str, round_number: int, *reasons: tuple[str, str]) -> DecisionRecord:
    return DecisionRecord(
        run_id="run-1",
        round=round_number,
        client_id=client,
        allowed=not reasons,
        reasons=reasons,
        facts={"client_id": client, "l2_norm": float("inf") if reasons else 1.5},
    )


def test_decisions_are_kept_and_read_back_in_order(database: Database) -> None:
    log = PolicyDecisionLog(database)
    assert log.decisions("run-1") == [] and log.record([]) == 0
    too_big = ("l2_norm_above_bound", "l2 norm inf above the bound 100")
    written = log.record(
        [decision("a", 1), decision("b", 1, too_big), decision("a", 2, too_big, ("x", "y"))]
    )
    assert written == 3
    kept = log.decisions("run-1")
    assert [(d.client_id, d.round, d.allowed) for d in kept] == [
        ("a", 1, True),
        ("b", 1, False),
        ("a", 2, False),
    ]
    assert kept[1].reasons == (too_big,) and kept[1].facts["l2_norm"] == "inf"  # strict JSON
    assert kept[0].decided_at is not None and kept[0].decided_at.tzinfo is not None
    assert [d.client_id for d in log.decisions("run-1", round_number=2)] == ["a"]
    assert len(log.decisions("run-1", denied_only=True)) == 2
    assert log.denial_counts("run-1") == {"l2_norm_above_bound": 2, "x": 1}
    assert log.decisions("another-run") == []


def test_decisions_survive_reopening_the_database(database_url: str) -> None:
    first = open_database(database_url)
    PolicyDecisionLog(first).record([decision("a", 1, ("client_not_active", "suspended"))])
    first.close()
    again = open_database(database_url)
    try:
        [kept] = PolicyDecisionLog(again).decisions("run-1")
    finally:
        again.close()
    assert kept.reasons == (("client_not_active", "suspended"),)


@pytest.mark.parametrize(
    ("allowed", "reasons", "round_number"),
    [(True, (("x", "y"),), 1), (False, (), 1), (True, (), -1)],
)
def test_an_inconsistent_record_is_refused(
    allowed: bool, reasons: tuple[tuple[str, str], ...], round_number: int
) -> None:
    with pytest.raises(RegistryError):
        DecisionRecord(
            run_id="r",
            round=round_number,
            client_id="a",
            allowed=allowed,
            reasons=reasons,
            facts={},
        )
