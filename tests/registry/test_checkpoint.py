"""The SQLite registry's write-ahead log is checkpointed by a thread of its own, not in a commit."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from shoal.core.device import DeviceState
from shoal.registry import ClientRegistry, open_database
from shoal.registry.database import SQLITE_BACKSTOP_CHECKPOINT_PAGES, Checkpointer


def _wait_for(condition: Callable[[], bool], *, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.01)


def test_a_write_wakes_the_checkpointer_which_copies_the_log_into_the_file(
    tmp_path: Path,
) -> None:
    database = open_database(None, folder=tmp_path)
    checkpointer = database.checkpointer
    assert checkpointer is not None
    try:
        ClientRegistry(database).enroll("phone-1", DeviceState(device_class="phone"))
        _wait_for(lambda: checkpointer.checkpoints >= 1)
        # the commit itself checkpoints only past the backstop, far above one write
        with database.read() as connection:
            pages = connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()
        assert pages == SQLITE_BACKSTOP_CHECKPOINT_PAGES
    finally:
        database.close()
    # what was written is in the database file, read by a plain connection
    with sqlite3.connect(tmp_path / "registry.db") as plain:
        assert plain.execute("SELECT client_id FROM clients").fetchall() == [("phone-1",)]


def test_the_thread_starts_with_the_writes_and_stops_on_close(tmp_path: Path) -> None:
    database = open_database(None, folder=tmp_path)  # the migrations are writes
    checkpointer = database.checkpointer
    assert checkpointer is not None
    ClientRegistry(database).enroll("phone-1", DeviceState())
    assert checkpointer.running
    database.close()
    assert not checkpointer.running
    database.close()  # twice is harmless
    checkpointer.wake()  # a stopped checkpointer starts no thread again
    assert not checkpointer.running


def test_writes_go_on_when_the_checkpointer_has_lost_its_file(tmp_path: Path) -> None:
    database = open_database(None, folder=tmp_path)
    try:
        registry = ClientRegistry(database)
        registry.enroll("phone-1", DeviceState())
        for leftover in tmp_path.glob("registry.db-*"):
            leftover.unlink(missing_ok=True)
        registry.enroll("phone-2", DeviceState())  # the writer never sees the thread's trouble
        assert {client.client_id for client in registry.list()} >= {"phone-1", "phone-2"}
    finally:
        database.close()


def test_an_in_memory_registry_has_no_checkpointer() -> None:
    database = open_database("sqlite:///:memory:")
    try:
        assert database.checkpointer is None
    finally:
        database.close()


def test_wakes_within_the_settling_time_share_one_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with sqlite3.connect(path) as setup:
        setup.execute("PRAGMA journal_mode = WAL")
        setup.execute("CREATE TABLE t (x INTEGER)")
    checkpointer = Checkpointer(str(path), settle_s=2.0)
    try:
        for _ in range(50):  # a burst of commits, far quicker than the settling time
            checkpointer.wake()
        time.sleep(0.2)  # a checkpoint per wake would have run by now; one that settles has not
        assert checkpointer.checkpoints == 0
        _wait_for(lambda: checkpointer.checkpoints >= 1)
        time.sleep(0.2)  # a second checkpoint, were one due, would need another two seconds
        assert checkpointer.checkpoints == 1
    finally:
        checkpointer.stop()
    assert not checkpointer.running
