"""A writer of a coordinator's registry (its own database, apart from the state folder) who
lacks the signing key: stripping every signature, or putting back an older copy, is told at
the restart, and nothing forged is signed or offered.

The attacker edits the registry between two lives of the coordinator. A registry with no
signature at all looked like one from a Shoal before signing, whose HEAD a restart signs as it
stands: the forged weights became the run's, signed by its own key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from shoal.config import Config, load_config
from shoal.coordinator.records import AUDIT_ANCHOR_FILE
from shoal.coordinator.server import build
from shoal.core.errors import SecurityError
from shoal.registry import BlobStore, ModelRegistry, open_database
from shoal.registry.schema import audit_heads, model_versions
from shoal.transport.certs import init_certificates

MODEL = "digits"


def job(tmp_path: Path, registry: str) -> Config:
    init_certificates(tmp_path / "certs")
    path = tmp_path / "job.toml"
    path.write_text(
        f'[run]\nname = "{MODEL}"\n[data]\nnum_clients = 4\n[round]\nclients_per_round = 2\n'
        f'[coordinator]\nstate_dir = "{tmp_path / "state"}"\n'
        f'certificates = "{tmp_path / "certs"}"\nregistry_url = "{registry}"\n'
        f'blob_url = "{tmp_path / "blobs"}"\n'
    )
    return load_config(path)


def strip_and_forge(registry: str, blobs: Path) -> str:
    """Swap HEAD's weights (blob and sha256) and clear every signature and signed head, as a
    registry from before signing looks; the forged sha256."""
    database = open_database(registry)
    try:
        models = ModelRegistry(database, BlobStore(str(blobs)))
        head = models.head(MODEL)
        assert head is not None
        honest = models.load(MODEL, head.version)
        forged = honest.with_vector(np.full_like(honest.vector, 7.0))
        with database.write() as connection:
            connection.execute(
                sa.update(model_versions)
                .where(model_versions.c.version == head.version)
                .values(blob=models.blobs.put(forged.to_bytes()), sha256=forged.sha256())
            )
            connection.execute(
                sa.update(model_versions).values(signature=None, signing_key_id=None, run_id=None)
            )
            connection.execute(sa.delete(audit_heads))
        return forged.sha256()
    finally:
        database.close()


def test_a_restart_refuses_a_registry_stripped_of_its_signatures(
    tmp_path: Path, shared_registry: str
) -> None:
    config = job(tmp_path, shared_registry)
    build(config).close()  # version 0 committed, its head signed; the folder keeps that head
    assert (tmp_path / "state" / AUDIT_ANCHOR_FILE).is_file()
    forged = strip_and_forge(shared_registry, tmp_path / "blobs")
    with pytest.raises(SecurityError, match="its signatures were removed or the registry was"):
        build(config)
    database = open_database(shared_registry)
    try:
        head = ModelRegistry(database, BlobStore(str(tmp_path / "blobs"))).head(MODEL)
    finally:
        database.close()
    assert head is not None and head.sha256 == forged and head.signed is None  # never signed
    with pytest.raises(SecurityError, match="its signatures were removed"):
        build(config)  # told again: the refused restart let the folder and the model go
