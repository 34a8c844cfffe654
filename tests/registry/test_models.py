"""The model registry on every backend: commit, HEAD, rollback, verdicts, corrupt blobs."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from shoal.core import IntegrityError, NotFoundError, Parameters, RegistryError
from shoal.governance import ModelSigner, PinnedKey, generate_signing_key, key_id_of
from shoal.registry import BlobStore, Database, ModelRegistry, ModelStatus, VersionSignature
from shoal.registry import blobs as blobs_module
from shoal.registry.models import HeadMoved

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
ARCH = "mlp-v1"


def params(value: float) -> Parameters:
    return Parameters.from_arrays([np.full((2, 2), value), np.full(3, value)], names=["w", "b"])


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def registry(database: Database, blobs: BlobStore) -> ModelRegistry:
    return ModelRegistry(database, blobs)


def commit(registry: ModelRegistry, value: float, **kwargs: object) -> int:
    record = registry.commit(
        "digits",
        params(value),
        round=int(value),
        architecture_version=ARCH,
        now=NOW,
        **kwargs,  # type: ignore[arg-type]
    )
    return record.version


def test_an_empty_registry(registry: ModelRegistry) -> None:
    assert registry.head("digits") is None
    assert registry.list("digits") == []
    assert registry.names() == []
    with pytest.raises(NotFoundError):
        registry.get("digits", 0)


def test_commits_chain_parents_and_move_head(registry: ModelRegistry) -> None:
    first = registry.commit("digits", params(0), round=0, architecture_version=ARCH, now=NOW)
    second = registry.commit(
        "digits",
        params(1),
        round=1,
        architecture_version=ARCH,
        metrics={"accuracy": 0.5, "per_class": [0.1, 0.9]},
        now=NOW,
    )
    assert (first.version, first.parent, first.status) == (0, None, ModelStatus.CANDIDATE)
    assert (second.version, second.parent, second.round) == (1, 0, 1)
    assert second.metrics == {"accuracy": 0.5, "per_class": [0.1, 0.9]}
    # what a commit returns is what was stored (it is not read back)
    assert registry.get("digits", 1) == second and registry.get("digits", 0) == first
    assert second.sha256 == params(1).sha256() and second.created_at == NOW
    assert registry.head("digits") == second
    assert registry.list("digits") == [first, second]
    assert registry.get("digits", 1) == second
    assert registry.load("digits", 1).sha256() == params(1).sha256()
    assert registry.names() == ["digits"]


def test_models_are_numbered_independently(registry: ModelRegistry) -> None:
    commit(registry, 0)
    other = registry.commit("speech", params(5), round=0, architecture_version="rnn-v2")
    assert other.version == 0 and other.parent is None
    assert registry.names() == ["digits", "speech"]


def test_an_explicit_parent_must_exist(registry: ModelRegistry) -> None:
    commit(registry, 0)
    commit(registry, 1)
    assert registry.get("digits", commit(registry, 2, parent=0)).parent == 0
    assert registry.get("digits", commit(registry, 3, parent=None)).parent is None
    with pytest.raises(NotFoundError):
        commit(registry, 4, parent=17)


def test_rollback_moves_head_and_keeps_later_versions(registry: ModelRegistry) -> None:
    for value in range(3):
        commit(registry, value)
    back = registry.rollback("digits", 1)
    assert back.version == 1 and registry.head("digits") == back
    assert [record.version for record in registry.list("digits")] == [0, 1, 2]
    branched = registry.get("digits", commit(registry, 9))
    assert (branched.version, branched.parent) == (3, 1)


def test_verdicts_and_refusing_to_roll_back_onto_a_bad_version(registry: ModelRegistry) -> None:
    for value in range(3):
        commit(registry, value)
    assert registry.mark("digits", 1, ModelStatus.BAD).status is ModelStatus.BAD
    assert registry.mark("digits", 0, ModelStatus.GOOD).status is ModelStatus.GOOD
    with pytest.raises(RegistryError, match="BAD"):
        registry.rollback("digits", 1)
    assert registry.head("digits").version == 2  # type: ignore[union-attr]
    assert registry.rollback("digits", 0).status is ModelStatus.GOOD
    with pytest.raises(NotFoundError):
        registry.mark("digits", 42, ModelStatus.GOOD)
    with pytest.raises(NotFoundError):
        registry.rollback("digits", 42)
    with pytest.raises(RegistryError, match="BAD"):
        commit(registry, 7, status=ModelStatus.BAD)


def test_a_verdict_keeps_its_reason_and_time(registry: ModelRegistry) -> None:
    commit(registry, 0)
    fresh = registry.get("digits", 0)
    assert (fresh.status, fresh.status_reason, fresh.status_changed_at) == (
        ModelStatus.CANDIDATE,
        None,
        None,
    )
    later = NOW + timedelta(hours=1)
    bad = registry.mark("digits", 0, ModelStatus.BAD, reason="accuracy fell to 0.1", now=later)
    assert (bad.status, bad.status_reason, bad.status_changed_at) == (
        ModelStatus.BAD,
        "accuracy fell to 0.1",
        later,
    )
    assert registry.get("digits", 0) == bad
    good = registry.mark("digits", 0, ModelStatus.GOOD, reason="false alarm", now=later)
    assert (good.status, good.status_reason) == (ModelStatus.GOOD, "false alarm")
    with pytest.raises(RegistryError, match="timezone-aware"):
        registry.mark("digits", 0, ModelStatus.BAD, now=datetime(2026, 1, 1))


def test_a_corrupt_blob_is_detected_and_never_rolled_back_to(
    registry: ModelRegistry, blobs: BlobStore
) -> None:
    commit(registry, 0)
    commit(registry, 1)
    record = registry.get("digits", 0)
    path = blobs.path(record.blob)
    data = bytearray(blobs.filesystem.cat_file(path))
    data[-1] ^= 0xFF
    blobs.filesystem.pipe_file(path, bytes(data))
    with pytest.raises(IntegrityError):
        registry.load("digits", 0)
    with pytest.raises(IntegrityError):
        registry.rollback("digits", 0)
    assert registry.head("digits").version == 1  # type: ignore[union-attr]


def test_a_state_blob_travels_with_its_version(registry: ModelRegistry) -> None:
    version = commit(registry, 0, state=b"optimizer moments")
    assert registry.load_state("digits", version) == b"optimizer moments"
    assert registry.load_state("digits", commit(registry, 1)) is None


@pytest.mark.parametrize(
    "metrics",
    [
        {"loss": float("nan")},
        {"loss": float("inf")},
        {"when": NOW},
        {"divergence": {"l2": {"p90": float("nan")}}},  # nested: refused all the same
    ],
)
def test_metrics_must_be_finite_json(registry: ModelRegistry, metrics: dict[str, object]) -> None:
    with pytest.raises(RegistryError, match="metric"):
        commit(registry, 0, metrics=metrics)
    assert registry.list("digits") == []


def test_bad_commits_are_refused(registry: ModelRegistry) -> None:
    with pytest.raises(RegistryError):
        registry.commit("", params(0), round=0, architecture_version=ARCH)
    with pytest.raises(RegistryError):
        registry.commit("digits", params(0), round=-1, architecture_version=ARCH)


@pytest.fixture
def memory_blobs() -> Iterator[BlobStore]:
    store = BlobStore(f"memory://shoal-models-{uuid.uuid4().hex}")
    yield store
    store.filesystem.rm(store.location.removeprefix("memory://"), recursive=True)


def test_blobs_can_live_in_any_fsspec_store(database: Database, memory_blobs: BlobStore) -> None:
    registry = ModelRegistry(database, memory_blobs)
    record = registry.commit("digits", params(3), round=3, architecture_version=ARCH)
    assert memory_blobs.exists(record.blob)
    assert registry.load("digits", record.version).sha256() == params(3).sha256()


def test_concurrent_commits_get_distinct_consecutive_versions(registry: ModelRegistry) -> None:
    errors: list[BaseException] = []

    def commit_some(offset: int) -> None:
        try:
            for step in range(4):
                commit(registry, offset * 10 + step)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=commit_some, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    records = registry.list("digits")
    assert [record.version for record in records] == list(range(16))
    assert registry.head("digits") == records[-1]
    assert all(record.parent == record.version - 1 for record in records[1:])


# --- signatures -----------------------------------------------------------------------------


def test_a_signer_signs_each_version_once_with_its_facts(registry: ModelRegistry) -> None:
    key = generate_signing_key()
    signed: list[tuple[str, int, int, str]] = []

    def signer(*, name: str, version: int, round: int, sha256: str) -> VersionSignature:
        signed.append((name, version, round, sha256))
        return ModelSigner(key, run_id="run-7")(
            name=name, version=version, round=round, sha256=sha256
        )

    commit(registry, 0)
    record = registry.commit(
        "digits", params(1), round=1, architecture_version=ARCH, now=NOW, signer=signer
    )
    assert signed == [("digits", 1, 1, params(1).sha256())]
    stored = registry.get("digits", 1)
    assert stored.signed == record.signed and stored.signed is not None
    assert (stored.signed.run_id, stored.signed.key_id) == ("run-7", key_id_of(key.public_key()))
    PinnedKey.of(key.public_key()).verify(
        stored.signed, name="digits", version=1, round=1, sha256=stored.sha256
    )
    assert registry.get("digits", 0).signed is None  # committed without a signer
    head = registry.head("digits")
    assert head is not None and head.signed == stored.signed


def test_a_signer_that_fails_commits_nothing(registry: ModelRegistry) -> None:
    def signer(*, name: str, version: int, round: int, sha256: str) -> VersionSignature:
        raise RegistryError("the signing key is gone")

    with pytest.raises(RegistryError, match="signing key"):
        commit(registry, 0, signer=signer)
    assert registry.head("digits") is None and registry.list("digits") == []


def test_an_unsigned_version_is_signed_later_once_and_never_re_signed(
    registry: ModelRegistry,
) -> None:
    commit(registry, 0)
    first = ModelSigner(generate_signing_key(), run_id="r")
    signed = registry.sign("digits", 0, first)
    assert signed.signed is not None and signed.signed.key_id == first.key_id
    PinnedKey.of(first.private_key.public_key()).verify(
        signed.signed, name="digits", version=0, round=0, sha256=signed.sha256
    )
    other = ModelSigner(generate_signing_key(), run_id="r")
    assert registry.sign("digits", 0, other).signed == signed.signed  # kept, not replaced


def test_a_corrupt_blob_is_never_signed(registry: ModelRegistry, blobs: BlobStore) -> None:
    commit(registry, 0)
    Path(blobs.path(registry.get("digits", 0).blob)).write_bytes(b"not the weights")
    with pytest.raises(IntegrityError):
        registry.sign("digits", 0, ModelSigner(generate_signing_key(), run_id="r"))
    assert registry.get("digits", 0).signed is None


def test_a_commit_returns_once_its_blob_is_written(
    registry: ModelRegistry, blobs: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = blobs_module._write_local_file

    def slow(target: str, data: bytes, *, durable: bool) -> None:
        time.sleep(0.2)  # long after the rows are: the commit must still wait for it
        write(target, data, durable=durable)

    monkeypatch.setattr(blobs_module, "_write_local_file", slow)
    record = registry.commit("digits", params(1), round=1, architecture_version=ARCH, now=NOW)
    assert blobs.exists(record.blob)
    assert registry.load("digits", record.version).sha256() == params(1).sha256()


def test_a_blob_that_cannot_be_written_commits_nothing(
    registry: ModelRegistry, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = commit(registry, 0)

    def full(target: str, data: bytes, *, durable: bool) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(blobs_module, "_write_local_file", full)
    with pytest.raises(RegistryError, match="No space left"):
        commit(registry, 1)

    def round_records() -> None:
        with database.write():
            registry.audit.append("select", subject="round 2")
            commit(registry, 2)

    # inside a round's transaction, the rest of the round's records go with it
    with pytest.raises(RegistryError, match="No space left"):
        round_records()
    assert [record.version for record in registry.list("digits")] == [first]
    assert registry.head("digits").version == first  # type: ignore[union-attr]
    assert [entry.subject for entry in registry.audit.entries(kind="select")] == []


def test_a_commit_alone_writes_its_blob_before_it_takes_the_write_lock(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = blobs_module._write_local_file
    probes = []

    def writing_meanwhile(target: str, data: bytes, *, durable: bool) -> None:
        # another writer while the blob is being written: it would wait for the lock (and the
        # commit for it) if the commit held the lock already
        probes.append(registry.audit.append("probe", subject="during the blob's write"))
        write(target, data, durable=durable)

    monkeypatch.setattr(blobs_module, "_write_local_file", writing_meanwhile)
    record = registry.commit("digits", params(1), round=1, architecture_version=ARCH, now=NOW)
    assert len(probes) == 1
    kinds = [entry.kind for entry in registry.audit.entries()]
    assert kinds.index("probe") < kinds.index("commit")
    assert registry.head("digits") == record


def test_a_commit_built_on_a_version_no_longer_head_is_refused(registry: ModelRegistry) -> None:
    """A run that trained from version 2 while an operator rolled HEAD back to 1 must not
    store its version as 1's child: nothing is stored, and the refusal names both."""
    for value in range(3):
        commit(registry, value)
    registry.rollback("digits", 1, reason="round 2 looked poisoned", now=NOW)
    with pytest.raises(HeadMoved, match="HEAD of digits is version 1, not version 2") as moved:
        commit(registry, 3, expected_head=2)
    assert (moved.value.expected, moved.value.head) == (2, 1)
    assert [record.version for record in registry.list("digits")] == [0, 1, 2]
    assert commit(registry, 3, expected_head=1) == 3  # built on HEAD: stored
