"""The participation log, on every registry backend: kept, read back, found, and a replay's rows."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from shoal.core import RegistryError
from shoal.registry import Database, open_database
from shoal.registry.participation import Participation, ParticipationLog

NOW = datetime(2026, 3, 4, 13, 47, 29, 123456, tzinfo=UTC)


def entry(
    name: str, round_number: int, version: int | None = None, **fields: object
) -> Participation:
    return Participation(
        run_id="run-1", round=round_number, participant=name, model_version=version, **fields
    )


def measured(name: str, round_number: int, version: int, *, flagged: bool = False) -> Participation:
    return entry(
        name,
        round_number,
        version,
        l2_to_aggregate=1.5,
        cosine_to_aggregate=0.25,
        l2_to_median=2.0,
        cosine_to_median=-0.75,
        z_score=4.0,
        flagged=flagged,
    )


def test_rounds_are_kept_and_read_back(database: Database) -> None:
    log = ParticipationLog(database)
    assert log.rounds("run-1") == [] and log.round("run-1", 1) == [] and log.record([]) == 0
    written = log.record(
        [measured("a", 1, 1), measured("b", 1, 1, flagged=True), entry("a", 2, 2)], now=NOW
    )
    assert written == 3
    assert log.rounds("run-1") == [1, 2] and log.rounds("another-run") == []
    first = log.round("run-1", 1)
    assert [(e.participant, e.flagged) for e in first] == [("a", False), ("b", True)]
    kept = first[1]
    assert (kept.l2_to_aggregate, kept.cosine_to_aggregate) == (1.5, 0.25)
    assert (kept.l2_to_median, kept.cosine_to_median, kept.z_score) == (2.0, -0.75, 4.0)
    assert kept.model_version == 1 and kept.recorded_at == NOW
    [unmeasured] = log.round("run-1", 2)  # a secure round: who, never how far
    assert unmeasured.l2_to_median is None and unmeasured.flagged is None


def test_find_gives_every_round_of_the_named_participants(database: Database) -> None:
    log = ParticipationLog(database)
    log.record([entry("a", 2, 2), entry("b", 1, 1), entry("a", 1, 1), entry("c", 3, 3)])
    found = log.find("run-1", ["a", "c", "nobody"])
    assert [(e.participant, e.round) for e in found] == [("a", 1), ("a", 2), ("c", 3)]
    assert log.find("run-1", []) == [] and log.find("another-run", ["a"]) == []


def test_find_reads_past_the_parameter_limit_of_one_statement(database: Database) -> None:
    log = ParticipationLog(database)
    names = [f"client-{index:04d}" for index in range(1200)]
    log.record([entry(name, 1, 1) for name in names])
    assert len(log.find("run-1", names)) == 1200


def test_a_replayed_round_returns_its_latest_play(database: Database) -> None:
    log = ParticipationLog(database)
    log.record([measured("a", 5, 5), measured("b", 5, 5)])  # the play rolled back later
    log.record([measured("a", 5, 7), measured("c", 5, 7)])  # the replay, on another branch
    assert [(e.participant, e.model_version) for e in log.round("run-1", 5)] == [
        ("a", 7),
        ("c", 7),
    ]
    assert [e.model_version for e in log.find("run-1", ["a"])] == [5, 7]  # both stay for audit
    assert log.rounds("run-1") == [5]


def test_an_uncommitted_round_is_kept_without_a_version(database: Database) -> None:
    log = ParticipationLog(database)
    log.record([entry("a", 1)])
    assert [e.model_version for e in log.round("run-1", 1)] == [None]


def test_times_are_floored_to_the_granularity_and_nan_is_null(database: Database) -> None:
    log = ParticipationLog(database, granularity_s=3600)
    log.record([entry("a", 1, 1, z_score=math.nan, l2_to_median=math.inf)], now=NOW)
    [kept] = log.round("run-1", 1)
    assert kept.recorded_at == datetime(2026, 3, 4, 13, tzinfo=UTC)
    assert kept.z_score is None and kept.l2_to_median == math.inf


def test_participation_survives_reopening_the_database(database_url: str) -> None:
    first = open_database(database_url)
    ParticipationLog(first).record([measured("a", 1, 1, flagged=True)])
    first.close()
    again = open_database(database_url)
    try:
        [kept] = ParticipationLog(again).round("run-1", 1)
    finally:
        again.close()
    assert kept.flagged is True and kept.participant == "a"


@pytest.mark.parametrize(("round_number", "name"), [(0, "a"), (-1, "a"), (1, "")])
def test_an_impossible_entry_is_refused(round_number: int, name: str) -> None:
    with pytest.raises(RegistryError):
        entry(name, round_number)


def test_a_naive_time_is_refused(database: Database) -> None:
    with pytest.raises(RegistryError, match="timezone-aware"):
        ParticipationLog(database).record([entry("a", 1)], now=datetime(2026, 1, 1))
