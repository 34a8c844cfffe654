"""Attack tests: each performs an attack or fault against the real code."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A registry URL apart from any state folder (a SQLite file, or a schema of its own in the
    PostgreSQL of ``SHOAL_TEST_POSTGRES_URL``), as coordinators are given one."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    raw = os.environ.get("SHOAL_TEST_POSTGRES_URL")
    if not raw:
        pytest.skip("SHOAL_TEST_POSTGRES_URL is not set")
    import sqlalchemy as sa

    from shoal.registry.database import resolve_database_url

    schema = f"shoal_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(resolve_database_url(raw))
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = resolve_database_url(raw).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
