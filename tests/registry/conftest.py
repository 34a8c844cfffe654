"""The abstract registry suite's fixture: every test that takes ``database`` runs on each backend.

As Flower's linkstate tests do, one suite runs against every storage
backend: SQLite (a WAL file in the test's folder) and PostgreSQL (a fresh
schema per test, selected through ``search_path`` and dropped afterwards,
so parallel runs never collide). The PostgreSQL half reads its server from
``SHOAL_TEST_POSTGRES_URL`` and skips only when that is unset or the server
cannot be reached.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from shoal.registry import Database, open_database
from shoal.registry.database import resolve_database_url

POSTGRES_URL_VARIABLE = "SHOAL_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_server_url() -> sa.URL:
    """The test server's URL (psycopg driver), or a skip when there is none to reach."""
    raw = os.environ.get(POSTGRES_URL_VARIABLE)
    if not raw:
        pytest.skip(f"{POSTGRES_URL_VARIABLE} is not set")
    url = resolve_database_url(raw)
    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        message = f"PostgreSQL at {url.render_as_string()} is unreachable: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI runs the PostgreSQL half: it must never skip there
        pytest.skip(message)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def postgres_schema_url(postgres_server_url: sa.URL) -> Iterator[str]:
    """A URL whose connections live in a fresh schema, dropped when the test ends."""
    schema = f"shoal_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server_url)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = postgres_server_url.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to an empty database on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_schema_url")
    return url


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """A migrated, empty registry database on each backend in turn."""
    database = open_database(database_url)
    try:
        yield database
    finally:
        database.close()
