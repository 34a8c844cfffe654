"""Model versions in a run folder: commit, verify, roll back, survive torn writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shoal.aggregation.optimizers import server_adam
from shoal.coordinator import VersionStore
from shoal.core import IntegrityError, Parameters, RunError


def params(value: float) -> Parameters:
    return Parameters.from_arrays([np.full((2, 2), value), np.full(3, value)], names=["w", "b"])


def test_empty_store_has_no_head(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    assert store.head() is None and store.versions() == []
    with pytest.raises(RunError):
        store.get(0)


def test_commit_chains_parents_and_moves_head(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    first = store.commit(params(0), round_number=0, virtual_time_s=0.0, metrics={})
    second = store.commit(params(1), round_number=1, virtual_time_s=5.0, metrics={"accuracy": 0.5})
    assert (first.version, first.parent) == (0, None)
    assert (second.version, second.parent, second.round) == (1, 0, 1)
    assert store.head() == second
    assert store.load(1).sha256() == params(1).sha256() == second.sha256
    assert VersionStore(tmp_path).versions() == [first, second]


def test_rollback_then_commit_branches_from_the_old_version(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    for value in range(3):
        store.commit(params(value), round_number=value, virtual_time_s=float(value), metrics={})
    store.rollback(1)
    assert store.head().version == 1  # type: ignore[union-attr]
    branch = store.commit(params(9), round_number=2, virtual_time_s=2.0, metrics={})
    assert (branch.version, branch.parent) == (3, 1)
    assert len(store.versions()) == 4  # nothing is deleted: the bad versions stay for audit


def test_tampered_blob_is_detected(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    record = store.commit(params(1), round_number=1, virtual_time_s=0.0, metrics={})
    blob = tmp_path / record.file_name
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.load(record.version)
    with pytest.raises(IntegrityError):
        store.rollback(record.version)


def test_torn_index_line_is_ignored(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    store.commit(params(1), round_number=1, virtual_time_s=0.0, metrics={})
    with (tmp_path / "index.jsonl").open("a") as index:
        index.write('{"version": 1, "rou')
    reopened = VersionStore(tmp_path)
    assert [record.version for record in reopened.versions()] == [0]
    assert reopened.head().version == 0  # type: ignore[union-attr]
    reopened.commit(params(2), round_number=1, virtual_time_s=1.0, metrics={})
    assert [record.version for record in VersionStore(tmp_path).versions()] == [0, 1]


def test_optimizer_state_round_trips(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    optimizer = server_adam(learning_rate=0.1)
    vector = params(0).vector
    state = optimizer.init(vector)
    _, state = optimizer.update(np.ones_like(vector), state, vector)
    record = store.commit(
        params(0), round_number=1, virtual_time_s=0.0, metrics={}, optimizer_state=state
    )
    restored = store.load_state(record.version, optimizer.init(vector))
    for saved, loaded in zip(state, restored, strict=True):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded))
