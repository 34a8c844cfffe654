"""insert_rows: the same rows as SQLAlchemy's own INSERT, on every backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from shoal.core.errors import RegistryError
from shoal.registry import Database
from shoal.registry.database import EncodedJSON
from shoal.registry.rows import insert_plan, insert_rows
from shoal.registry.schema import ModelStatus, model_versions, policy_decisions, round_participants

AT = datetime(2026, 12, 6, 9, 30, 15, 123456, tzinfo=UTC)
EAST = timezone(timedelta(hours=5, minutes=30))


def _participants(run_id: str) -> list[dict[str, object]]:
    return [
        {
            "run_id": run_id,
            "round": 3,
            "model_version": None if index == 2 else 7,
            "participant": f"p{index}",
            "l2_to_aggregate": 0.25 * index,
            "cosine_to_aggregate": None,
            "l2_to_median": 1e-300,
            "cosine_to_median": -1.0,
            "z_score": float(index),
            "flagged": index % 2 == 0,
            # shared by three rows, then one each, the last in another zone (stored in UTC)
            "recorded_at": AT if index < 3 else (AT + timedelta(hours=index)).astimezone(EAST),
        }
        for index in range(5)
    ]


def _stored(database: Database, table: sa.Table, run_id: str) -> list[tuple[object, ...]]:
    key = table.primary_key.columns.values()[0]
    columns = [c for c in table.c if c is not key]
    with database.read() as connection:
        query = sa.select(*columns).where(table.c.run_id == run_id).order_by(key)
        return [tuple(row) for row in connection.execute(query)]


def test_rows_read_back_as_sqlalchemys_own_insert_writes_them(database: Database) -> None:
    with database.write() as connection:
        connection.execute(round_participants.insert(), _participants("theirs"))
        insert_rows(connection, round_participants, _participants("ours"))
    theirs = _stored(database, round_participants, "theirs")
    ours = _stored(database, round_participants, "ours")
    assert [row[1:] for row in ours] == [row[1:] for row in theirs]
    assert ours[0][-1] == AT and ours[4][-1] == AT + timedelta(hours=4)
    assert ours[4][-1].tzinfo is UTC


def test_json_booleans_and_encoded_json_go_through_the_columns_converters(
    database: Database,
) -> None:
    rows = [
        {
            "run_id": "r",
            "round": 0,
            "client_id": f"c{index}",
            "allowed": index == 0,
            "reasons": EncodedJSON("[]") if index == 0 else [{"code": "x", "detail": "y"}],
            "facts": {"l2": 1.5, "name": "é"},
            "decided_at": AT,
        }
        for index in range(2)
    ]
    with database.write() as connection:
        insert_rows(connection, policy_decisions, rows)
    stored = _stored(database, policy_decisions, "r")
    assert [row[3] for row in stored] == [True, False]
    assert stored[0][4] == [] and stored[1][4] == [{"code": "x", "detail": "y"}]
    assert stored[1][5] == {"l2": 1.5, "name": "é"}


def test_enums_and_bytes_of_a_version_row(database: Database) -> None:
    row = {
        "name": "m",
        "version": 0,
        "round": 1,
        "parent": None,
        "sha256": "ab" * 32,
        "blob": "cd" * 32,
        "state_blob": None,
        "created_at": AT,
        "metrics": EncodedJSON('{"loss": 0.5}'),
        "status": ModelStatus.CANDIDATE,
        "architecture_version": "a",
        "run_id": "run",
        "signing_key_id": "k",
        "signature": b"\x00\xff" * 32,
    }
    with database.write() as connection:
        insert_rows(connection, model_versions, [row])
    with database.read() as connection:
        stored = connection.execute(sa.select(model_versions)).one()
    assert stored.status is ModelStatus.CANDIDATE
    assert stored.signature == b"\x00\xff" * 32 and stored.metrics == {"loss": 0.5}


def test_no_rows_is_no_statement(database: Database) -> None:
    with database.write() as connection:
        insert_rows(connection, round_participants, [])
    assert _stored(database, round_participants, "ours") == []


def test_a_failed_insert_is_the_registrys_error_and_nothing_of_it_stays(
    database: Database,
) -> None:
    bad = _participants("ours")
    bad[3]["participant"] = None  # NOT NULL
    with pytest.raises(RegistryError), database.write() as connection:
        insert_rows(connection, round_participants, bad)
    assert _stored(database, round_participants, "ours") == []


def test_unknown_columns_and_python_side_defaults_are_refused() -> None:
    dialect = sa.create_engine("sqlite://").dialect
    with pytest.raises(RegistryError, match="no column 'nope'"):
        insert_plan(dialect, round_participants, ("run_id", "nope"))
    table = sa.Table(
        "defaults",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.Integer, default=lambda: 1),
        sa.Column("text", sa.String),
    )
    with pytest.raises(RegistryError, match="Python-side default"):
        insert_plan(dialect, table, ("text",))
    assert insert_plan(dialect, table, ("at", "text")).columns == ("at", "text")
