"""What a resumed run trains on: HEAD signed by the run's key, or from before signing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from shoal.coordinator.records import RunRecords
from shoal.core.errors import SecurityError
from shoal.core.parameters import Parameters
from shoal.governance.model_signing import ModelSigner, PinnedKey, generate_signing_key
from shoal.registry import BlobStore, ClientRegistry, ModelRegistry, open_database
from shoal.registry.schema import model_versions

KEY = generate_signing_key()


def records(folder: Path, key: object = KEY) -> RunRecords:
    database = open_database(None, folder=folder / "registry")
    models = ModelRegistry(database, BlobStore(str(folder / "blobs")))
    signer = ModelSigner(key, run_id="run-1")  # type: ignore[arg-type]
    return RunRecords(
        folder,
        models,
        ClientRegistry(database),
        model="net",
        signer=signer,
        head_signer=signer.audit_head,
        pinned=PinnedKey.of(signer.private_key.public_key()),
    )


def weights(value: float) -> Parameters:
    return Parameters.from_arrays([np.full(3, value)], names=["w"])


def test_a_version_from_before_signing_is_signed_when_the_log_recorded_it_so(
    tmp_path: Path,
) -> None:
    """A registry from before signing, signed from its first resume on: a rollback to one of
    its old versions was refused as 'changed outside Shoal'; a version the log recorded with
    another sha256, or a key change, is refused with what to do."""
    store = records(tmp_path)
    models = store.models
    try:
        for value in (0.0, 1.0, 2.0):  # a Shoal before signing: no signer, no signed head
            models.commit("net", weights(value), round=int(value), architecture_version="a")
        head = store.vouch(models.get("net", 2))  # nothing signed yet: signed now
        assert head.signed is not None
        with store.transaction():  # the resumed run commits, signed, and signs the log's head
            store.commit(weights(3.0), round_number=3, metrics={}, state=b"", architecture="a")
            store.sign_audit_head()
        old = store.vouch(models.get("net", 1))  # rolled back to: its commit was unsigned
        assert old.signed is not None and old.sha256 == weights(1.0).sha256()
        forged = weights(7.0)
        with models.database.write() as connection:  # a registry writer's version 0
            connection.execute(
                sa.update(model_versions)
                .where(model_versions.c.version == 0)
                .values(sha256=forged.sha256(), blob=models.blobs.put(forged.to_bytes()))
            )
        with pytest.raises(SecurityError, match="HEAD, is not signed, in a registry whose"):
            store.vouch(models.get("net", 0))
    finally:
        models.database.close()
    other = records(tmp_path, generate_signing_key())
    try:
        with pytest.raises(SecurityError, match="is another than the one that signed HEAD"):
            other.vouch(other.models.get("net", 3))
    finally:
        other.models.database.close()
