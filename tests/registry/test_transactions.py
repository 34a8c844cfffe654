"""A write inside a write on the same thread joins it: one transaction, all of it or none.

Runs on each backend (``database`` fixture): a round's records are one transaction on
PostgreSQL as on SQLite.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from shoal.core.errors import NotFoundError, RegistryError
from shoal.registry import AuditLog, Database
from shoal.registry.audit import audit_log


def _seqs(database: Database) -> list[int]:
    with database.read() as connection:
        return [row.seq for row in connection.execute(sa.select(audit_log.c.seq))]


def test_nested_writes_commit_together_with_the_outer_block(database: Database) -> None:
    log = AuditLog(database)
    with database.write():
        log.append("first")
        log.append("second")  # the tail read once per transaction still chains them
        assert _seqs(database) == [1, 2]  # a nested read sees the transaction's own writes
    assert [entry.kind for entry in log.entries()] == ["first", "second"]
    assert log.entries()[1].prev_hash == log.entries()[0].hash


def test_an_error_in_the_outer_block_rolls_back_every_nested_write(database: Database) -> None:
    log = AuditLog(database)
    log.append("kept")

    def failed_round() -> None:
        with database.write():
            log.append("lost")
            raise RuntimeError("the round failed")

    with pytest.raises(RuntimeError):
        failed_round()
    assert [entry.kind for entry in log.entries()] == ["kept"]
    log.append("next")  # the tail cached in the failed transaction is not reused
    assert [entry.seq for entry in log.entries()] == [1, 2]


def test_a_failed_nested_write_dooms_the_transaction_even_when_caught(
    database: Database,
) -> None:
    log = AuditLog(database)

    def caught_inside() -> None:
        with database.write():
            log.append("lost")
            try:
                with database.write():
                    raise NotFoundError("a half-done change")
            except NotFoundError:
                pass  # the caller goes on: the outer block must not commit a half

    with pytest.raises(RegistryError, match="nothing of the transaction was committed"):
        caught_inside()
    assert log.entries() == []


def test_a_caught_error_in_a_nested_read_does_not_doom_the_transaction(
    database: Database,
) -> None:
    log = AuditLog(database)
    with database.write():
        log.append("kept")
        try:
            with database.read():
                raise NotFoundError("no such client")
        except NotFoundError:
            pass
    assert [entry.kind for entry in log.entries()] == ["kept"]


def test_another_thread_does_not_join_and_sees_nothing_until_commit(
    database: Database,
) -> None:
    log = AuditLog(database)
    seen: list[list[int]] = []
    with database.write():
        log.append("pending")
        reader = threading.Thread(target=lambda: seen.append(_seqs(database)))
        reader.start()
        reader.join(timeout=30)
    assert seen == [[]]
    assert _seqs(database) == [1]
