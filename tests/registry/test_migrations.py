"""Schema migrations: recorded, idempotent, concurrent-safe, and a newer database refused."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from shoal.core import ConfigError, RegistryError
from shoal.registry import (
    MIGRATIONS,
    SCHEMA_VERSION,
    BlobStore,
    ClientRegistry,
    ClientStatus,
    Database,
    DeviceState,
    EnrollmentTokens,
    ListedToken,
    Migration,
    ModelRegistry,
    ModelStatus,
    TokenOrigin,
    open_database,
    token_id_of,
)
from shoal.registry.database import create_engine, resolve_database_url
from shoal.registry.migrations import apply_migrations, check_schema_version, recorded_version
from shoal.registry.schema import (
    clients,
    metadata,
    model_versions,
    schema_version,
    version_requirements,
)
from shoal.registry.tokens import token_sha256


def recorded(database: Database) -> list[tuple[int, str]]:
    with database.read() as connection:
        rows = connection.execute(
            sa.select(schema_version.c.version, schema_version.c.description).order_by(
                schema_version.c.version
            )
        )
        return [(row.version, row.description) for row in rows]


def test_a_fresh_database_records_every_migration(database: Database) -> None:
    assert recorded(database) == [(m.version, m.description) for m in MIGRATIONS]
    assert recorded(database)[-1][0] == SCHEMA_VERSION


def test_migrating_yields_exactly_the_declared_schema(database: Database) -> None:
    with database.read() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    assert differences == []


def test_heartbeats_update_no_index(database: Database) -> None:
    """What changes at almost every heartbeat (battery, idleness, free RAM, last_seen) may not be
    indexed. Charging and WiFi, which change a few times a day, are in the sampling index (a
    selection tests them there): a heartbeat that leaves them as they were stays HOT."""
    every_heartbeat = {"battery_level", "idle", "ram_gb", "last_seen"}
    with database.read() as connection:
        indexes = sa.inspect(connection).get_indexes("clients")
        indexed = {column for index in indexes for column in index["column_names"]}
        assert indexed.isdisjoint(every_heartbeat)
        assert {"charging", "wifi"} <= indexed
        if database.dialect == "postgresql":  # and leave room for HOT updates
            options = connection.execute(
                sa.text("SELECT reloptions FROM pg_class WHERE oid = 'clients'::regclass")
            ).scalar()
            assert options is not None and "fillfactor=80" in options


def test_reopening_applies_nothing_and_keeps_data(database_url: str) -> None:
    with open_database(database_url) as first:
        with first.write() as connection:
            connection.execute(
                version_requirements.insert().values(
                    model="m", component="app", minimum_version="1", minimum_key="1"
                )
            )
        before = recorded(first)
        assert apply_migrations(first) == SCHEMA_VERSION
        assert recorded(first) == before
    with open_database(database_url) as second, second.read() as connection:
        assert recorded(second) == before
        assert connection.execute(sa.select(version_requirements.c.model)).scalars().all() == ["m"]


def test_an_older_database_gets_only_the_missing_migrations(database_url: str) -> None:
    database = Database(create_engine(resolve_database_url(database_url)))
    try:
        assert apply_migrations(database, migrations=MIGRATIONS[:1]) == 1
        assert [version for version, _ in recorded(database)] == [1]
        with database.read() as connection:
            assert not sa.inspect(connection).has_table("model_versions")
        assert apply_migrations(database) == SCHEMA_VERSION
        assert [version for version, _ in recorded(database)] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        database.close()


def test_rows_written_before_a_migration_survive_it(database_url: str, tmp_path: Path) -> None:
    """A registry made by an older Shoal (schema 4) keeps its versions and clients."""
    now = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
    database = Database(create_engine(resolve_database_url(database_url)))
    try:
        assert apply_migrations(database, migrations=MIGRATIONS[:4]) == 4
        with database.write() as connection:
            connection.execute(
                model_versions.insert().values(
                    name="digits", version=0, round=0, parent=None, sha256="a" * 64,
                    blob="b" * 64, created_at=now, metrics={"accuracy": 0.9}, status="BAD",
                    architecture_version="mlp-v1",
                )
            )  # fmt: skip
            connection.execute(
                clients.insert().values(
                    client_id="phone-1", device_class="phone", battery_level=0.4, charging=False,
                    wifi=True, ram_gb=3.0, app_version="2.4.1", app_version_key="x",
                    runtime_version="1", model_architecture_version="m", status="SUSPENDED",
                    status_reason="lost", can_train=True, sample_key=7, enrolled_at=now,
                    last_seen=now,
                )
            )  # fmt: skip
        assert apply_migrations(database) == SCHEMA_VERSION
        registry = ClientRegistry(database)
        phone = registry.get("phone-1")
        assert phone.device == DeviceState(
            device_class="phone", battery_level=0.4, charging=False, wifi=True, ram_gb=3.0,
            app_version="2.4.1", runtime_version="1", model_architecture_version="m",
        )  # fmt: skip
        assert (phone.status, phone.status_reason, phone.sample_key) == (
            ClientStatus.SUSPENDED,
            "lost",
            7,
        )
        registry.enroll("server-1", DeviceState(), now=now)  # facts unknown: NULL now
        assert registry.get("server-1").device.charging is None
        record = ModelRegistry(database, BlobStore(tmp_path / "blobs")).get("digits", 0)
        assert (record.status, record.metrics, record.created_at) == (
            ModelStatus.BAD,
            {"accuracy": 0.9},
            now,
        )
        assert (record.status_reason, record.status_changed_at) == (None, None)
        assert record.signed is None  # committed before signing existed: unsigned
    finally:
        database.close()


def test_tokens_issued_before_listed_tokens_existed_stay_issued_and_usable(
    database_url: str,
) -> None:
    """Schema 6 to 7: every stored token was issued by an operator, and still enrolls."""
    now = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
    database = Database(create_engine(resolve_database_url(database_url)))
    try:
        assert apply_migrations(database, migrations=MIGRATIONS[:6]) == 6
        with database.write() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO enrollment_tokens (token_id, token_sha256, uses, uses_left, "
                    "created_at, expires_at) VALUES (:id, :sha, 2, 2, :now, :until)"
                ),
                {
                    "id": token_id_of("old-token"),
                    "sha": token_sha256("old-token"),
                    "now": now.replace(tzinfo=None),
                    "until": (now + timedelta(days=1)).replace(tzinfo=None),
                },
            )
        assert apply_migrations(database) == SCHEMA_VERSION
        tokens = EnrollmentTokens(database)
        (record,) = tokens.list()
        assert (record.origin, record.uses_left) == (TokenOrigin.ISSUED, 2)
        assert tokens.redeem("old-token", client_id="c1", now=now).uses_left == 1
        tokens.sync_listed([ListedToken(token="new-token", max_uses=1)], now=now)
        assert {token.origin for token in tokens.list()} == {TokenOrigin.ISSUED, TokenOrigin.CONFIG}
    finally:
        database.close()


def test_a_read_only_open_migrates_nothing_and_refuses_an_older_schema(
    database_url: str,
) -> None:
    database = Database(create_engine(resolve_database_url(database_url)))
    try:
        apply_migrations(database, migrations=MIGRATIONS[:1])
    finally:
        database.close()
    with pytest.raises(RegistryError, match=r"schema version 1, older than this Shoal"):
        open_database(database_url, migrate=False)
    engine = create_engine(resolve_database_url(database_url))
    try:
        with engine.connect() as connection:
            assert recorded_version(connection) == 1  # nothing was migrated
    finally:
        engine.dispose()
    with open_database(database_url) as migrated:
        assert check_schema_version(migrated) == SCHEMA_VERSION
    with open_database(database_url, migrate=False) as viewer, viewer.read() as connection:
        assert recorded_version(connection) == SCHEMA_VERSION


def test_a_newer_database_is_refused_and_left_alone(database_url: str) -> None:
    with open_database(database_url) as database, database.write() as connection:
        connection.execute(
            schema_version.insert().values(
                version=SCHEMA_VERSION + 7,
                description="from the future",
                applied_at=sa.func.now(),
            )
        )
    with pytest.raises(RegistryError, match=r"schema version \d+, newer than this Shoal"):
        open_database(database_url)
    engine = create_engine(resolve_database_url(database_url))
    try:
        with engine.connect() as connection:
            assert recorded_version(connection) == SCHEMA_VERSION + 7
    finally:
        engine.dispose()


def test_concurrent_opens_apply_each_migration_once(database_url: str) -> None:
    errors: list[BaseException] = []

    def open_and_close() -> None:
        try:
            open_database(database_url).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with open_database(database_url) as database:
        assert [version for version, _ in recorded(database)] == list(range(1, SCHEMA_VERSION + 1))


def test_migrations_must_be_numbered_in_order(database: Database) -> None:
    def nothing(_operations: object) -> None:
        return None

    gap = (*MIGRATIONS, Migration(SCHEMA_VERSION + 2, "skips a number", nothing))
    with pytest.raises(RegistryError, match="numbered"):
        apply_migrations(database, migrations=gap)


def test_default_database_is_a_wal_sqlite_file_in_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    with open_database(None, folder=folder) as database:
        assert database.dialect == "sqlite"
        with database.read() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    assert (folder / "registry.db").is_file()


def test_an_in_memory_database_works() -> None:
    with open_database("sqlite:///:memory:") as database:
        assert recorded(database)[-1][0] == SCHEMA_VERSION


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h:5432/db", "postgresql+psycopg://u@h:5432/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_urls_are_normalised_to_the_supported_drivers(given: str, expected: str) -> None:
    assert resolve_database_url(given).render_as_string() == expected


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "not a url", "sqlite+pysqlcipher://"]
)
def test_unsupported_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        open_database(url)


def test_no_url_and_no_folder_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="URL or a folder"):
        open_database(None)


def test_an_unreachable_server_is_a_registry_error() -> None:
    with pytest.raises(RegistryError, match="unreachable"):
        open_database("postgresql://postgres@127.0.0.1:1/nothing")
