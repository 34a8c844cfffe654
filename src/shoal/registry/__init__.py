"""Shoal's registries: enrolled clients and their selection, model versions, and blobs.

Everything lives in one SQLAlchemy database (SQLite by default, PostgreSQL
by URL, see :func:`open_database`) plus a content-addressed blob store
(:class:`BlobStore`, a local folder or any fsspec URL).
"""

from shoal.core.device import DeviceState
from shoal.registry.blobs import BlobStore
from shoal.registry.clients import (
    ClientRecord,
    ClientRegistry,
    Heartbeat,
    HeartbeatBuffer,
)
from shoal.registry.database import Database, open_database
from shoal.registry.migrations import MIGRATIONS, SCHEMA_VERSION, Migration, apply_migrations
from shoal.registry.models import ModelRecord, ModelRegistry
from shoal.registry.schema import ClientStatus, ModelStatus
from shoal.registry.selector import SelectionCriteria, Selector
from shoal.registry.versioning import (
    Component,
    Eligibility,
    Requirement,
    VersionMatrix,
    version_key,
)

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "BlobStore",
    "ClientRecord",
    "ClientRegistry",
    "ClientStatus",
    "Component",
    "Database",
    "DeviceState",
    "Eligibility",
    "Heartbeat",
    "HeartbeatBuffer",
    "Migration",
    "ModelRecord",
    "ModelRegistry",
    "ModelStatus",
    "Requirement",
    "SelectionCriteria",
    "Selector",
    "VersionMatrix",
    "apply_migrations",
    "open_database",
    "version_key",
]
