"""A writer of a coordinator's registry (its own database, apart from the state folder) who
lacks the signing key: stripping every signature, or putting back an older copy, is told at
the restart, and nothing forged is signed or offered.

The attacker edits the registry between two lives of the coordinator. A registry with no
signature at all looked like one from a Shoal before signing, whose HEAD a restart signs as it
stands: the forged weights became the run's, signed by its own key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from shoal.config import Config, load_config
from shoal.coordinator.records import AUDIT_ANCHOR_FILE
from shoal.coordinator.server import build
from shoal.core.errors import SecurityError
from shoal.governance.model_signing import load_public_key
from shoal.registry import BlobStore, ModelRegistry, open_database
from shoal.registry.schema import audit_heads, model_versions
from shoal.transport.certs import init_certificates

MODEL = "digits"


def job(root: Path, registry: str, *, name: str = MODEL, blobs: Path | None = None) -> Config:
    """A coordinator of model ``name`` with its own state folder and certificates (so its own
    signing key) under ``root``, on ``registry``."""
    init_certificates(root / "certs")
    path = root / "job.toml"
    path.write_text(
        f'[run]\nname = "{name}"\n[report]\nenabled = false\n'
        "[data]\nnum_clients = 4\n[round]\nclients_per_round = 2\n"
        f'[coordinator]\nstate_dir = "{root / "state"}"\n'
        f'certificates = "{root / "certs"}"\nregistry_url = "{registry}"\n'
        f'blob_url = "{blobs or root / "blobs"}"\n'
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
    with pytest.raises(SecurityError, match="changed outside Shoal \\(its signatures removed"):
        build(config)
    database = open_database(shared_registry)
    try:
        head = ModelRegistry(database, BlobStore(str(tmp_path / "blobs"))).head(MODEL)
    finally:
        database.close()
    assert head is not None and head.sha256 == forged and head.signed is None  # never signed
    with pytest.raises(SecurityError, match="changed outside Shoal"):
        build(config)  # told again: the refused restart let the folder and the model go


def test_coordinators_sharing_a_registry_keep_each_their_own_head_and_restart(
    tmp_path: Path, shared_registry: str
) -> None:
    """Two coordinators with their own keys on one registry: the one that ended its run after
    the other signed the log's last entry kept that other key's head as its own, and every
    restart of it was refused. A run keeps only heads its own key signed."""
    roots = [tmp_path / name for name in ("alpha", "beta")]
    alpha, beta = (
        job(root, shared_registry, name=root.name, blobs=tmp_path / "blobs") for root in roots
    )
    first = build(alpha)
    second = build(beta)  # its version 0 is the log's last entry, under its key's head
    try:
        first.run.finish()  # the run's end signs the log's head: beta's is there already
    finally:
        first.close()
        second.close()
    kept = json.loads((roots[0] / "state" / AUDIT_ANCHOR_FILE).read_text())
    assert kept["key_id"] == load_public_key(roots[0] / "state" / "model-signing.pub").key_id
    build(alpha).close()  # restarted by its supervisor
    build(beta).close()
