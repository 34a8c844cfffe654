"""A registry keeps its reads of the barred clients and of client profiles until the clients
table changes (``Database.change_mark``): a run reads both every round, and they change far
less often. Each test plays a writer the kept read must not miss: the same registry, another
registry on the same database, another connection, another process, this thread's own open
transaction and its rollback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from shoal.core.device import DeviceState
from shoal.registry import ClientRegistry, ClientStatus, Database, open_database
from shoal.registry.clients import TABLE

IDS = [f"client-{index:03d}" for index in range(6)]


@pytest.fixture
def registry(database: Database) -> ClientRegistry:
    registry = ClientRegistry(database)
    registry.enroll_population({client_id: DeviceState() for client_id in IDS})
    return registry


@pytest.fixture
def file_database(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        yield database
    finally:
        database.close()


def _selects_of_clients(database: Database) -> list[str]:
    """Every SELECT of the clients table run through ``database`` from now on."""
    seen: list[str] = []

    @sa.event.listens_for(database.engine, "before_cursor_execute")
    def _seen(connection: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and " clients" in statement:
            seen.append(statement)

    return seen


def test_a_kept_read_is_served_until_the_registry_changes_a_client(
    file_database: Database,
) -> None:
    registry = ClientRegistry(file_database)
    registry.enroll_population({client_id: DeviceState() for client_id in IDS})
    selects = _selects_of_clients(file_database)
    assert registry.barred() == set()
    assert set(registry.profiles(IDS[:3])) == set(IDS[:3])
    read = len(selects)
    assert read == 2
    assert registry.barred() == set()  # kept: nothing changed
    assert set(registry.profiles(IDS[:2])) == set(IDS[:2])
    assert len(selects) == read
    assert set(registry.profiles(IDS[2:4])) == set(IDS[2:4])  # only the one not kept is read
    assert len(selects) == read + 1
    registry.set_status(IDS[0], ClientStatus.SUSPENDED, "poisoned")
    assert registry.barred() == {IDS[0]}
    assert registry.profiles([IDS[0]])[IDS[0]].status is ClientStatus.SUSPENDED
    registry.enroll("client-new", DeviceState(app_version="9.0.0"))
    assert registry.profiles(["client-new"])["client-new"].app_version == "9.0.0"


def test_a_kept_set_handed_out_cannot_change_the_kept_one(file_database: Database) -> None:
    registry = ClientRegistry(file_database)
    registry.enroll_population({client_id: DeviceState() for client_id in IDS})
    registry.set_status(IDS[1], ClientStatus.SUSPENDED)
    handed = registry.barred()
    handed.clear()
    assert registry.barred() == {IDS[1]}


def test_every_backend_sees_another_registrys_changes_at_once(
    database: Database, registry: ClientRegistry
) -> None:
    other = ClientRegistry(database)
    assert registry.barred() == set()
    assert registry.profiles([IDS[2]])[IDS[2]].status is ClientStatus.ACTIVE
    other.set_status(IDS[2], ClientStatus.RETIRED, "left")
    assert registry.barred() == {IDS[2]}
    assert registry.profiles([IDS[2]])[IDS[2]].status is ClientStatus.RETIRED
    other.enroll(IDS[3], DeviceState(device_class="phone"))
    assert registry.profiles([IDS[3]])[IDS[3]].device_class == "phone"


def test_a_change_committed_through_another_connection_is_seen_at_once(
    database_url: str, registry: ClientRegistry
) -> None:
    assert registry.barred() == set()
    assert registry.profiles(IDS)[IDS[4]].status is ClientStatus.ACTIVE
    elsewhere = open_database(database_url)  # an engine, a pool and connections of its own
    try:
        ClientRegistry(elsewhere).set_status(IDS[4], ClientStatus.SUSPENDED, "operator")
    finally:
        elsewhere.close()
    assert registry.barred() == {IDS[4]}
    assert registry.profiles(IDS)[IDS[4]].status is ClientStatus.SUSPENDED


def test_a_change_another_process_commits_is_seen_at_once(
    tmp_path: Path, file_database: Database
) -> None:
    registry = ClientRegistry(file_database)
    registry.enroll_population({client_id: DeviceState() for client_id in IDS})
    assert registry.barred() == set()
    assert registry.profiles(IDS)[IDS[5]].status is ClientStatus.ACTIVE
    script = (
        "import sys\n"
        "from shoal.registry import ClientRegistry, ClientStatus, open_database\n"
        "database = open_database(sys.argv[1])\n"
        "ClientRegistry(database).set_status(sys.argv[2], ClientStatus.SUSPENDED, 'operator')\n"
        "database.close()\n"
    )
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    subprocess.run([sys.executable, "-c", script, url, IDS[5]], check=True, timeout=120)
    assert registry.barred() == {IDS[5]}
    assert registry.profiles(IDS)[IDS[5]].status is ClientStatus.SUSPENDED


def test_inside_a_write_transaction_reads_are_its_own_and_a_rollback_is_not_kept(
    file_database: Database,
) -> None:
    registry = ClientRegistry(file_database)
    registry.enroll_population({client_id: DeviceState() for client_id in IDS})
    assert registry.barred() == set()
    seen: list[set[str]] = []

    def failing_round() -> None:
        with file_database.write():
            registry.set_status(IDS[0], ClientStatus.SUSPENDED, "in a round that fails")
            assert file_database.change_mark(TABLE) is None  # never kept in here
            seen.append(registry.barred())
            raise RuntimeError("round failed")

    with pytest.raises(RuntimeError, match="round failed"):
        failing_round()
    assert seen == [{IDS[0]}]  # the transaction's own change
    assert registry.barred() == set()  # rolled back
    assert registry.profiles([IDS[0]])[IDS[0]].status is ClientStatus.ACTIVE


def test_postgresql_reads_are_never_kept(postgres_schema_url: str) -> None:
    database = open_database(postgres_schema_url)
    try:
        assert database.change_mark(TABLE) is None
        registry = ClientRegistry(database)
        registry.enroll_population({client_id: DeviceState() for client_id in IDS})
        selects = _selects_of_clients(database)
        registry.barred()
        registry.barred()
        assert len(selects) == 2
    finally:
        database.close()


def test_marks_differ_across_connections_and_after_changes(file_database: Database) -> None:
    first = file_database.change_mark(TABLE)
    assert first is not None and first == file_database.change_mark(TABLE)
    file_database.changed(TABLE)
    assert file_database.change_mark(TABLE) != first
    assert file_database.change_mark("another table") is not None
