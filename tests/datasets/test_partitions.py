"""Partitions are taken by position or id, built on access, and refuse anything else clearly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core.errors import DataError
from shoal.datasets import Partition, Partitions
from shoal.datasets.arrays import FloatArray, IndexArray, LabelArray


def load_rows(rows: IndexArray) -> tuple[FloatArray, LabelArray]:
    return rows.astype(np.float32).reshape(-1, 1), rows.copy()


def numbered(ids: list[str]) -> Partitions:
    def load(index: int) -> Partition:
        rows = np.arange(index, dtype=np.int64)
        return Partition(index=index, id=ids[index], rows=rows, loader=load_rows)

    return Partitions(ids=ids, load=load)


def test_a_partition_is_taken_by_position_and_by_id() -> None:
    parts = numbered(["x", "y", "z"])
    assert len(parts) == 3
    assert parts[2].id == "z"
    assert parts["y"].index == 1
    assert parts.position("z") == 2
    assert [part.id for part in parts] == ["x", "y", "z"]


def test_a_partition_loads_its_rows_as_numpy() -> None:
    part = numbered(["x", "y", "z"])[2]
    features, labels = part.to_numpy()
    assert len(part) == 2
    np.testing.assert_array_equal(labels, [0, 1])
    assert features.shape == (2, 1)


def test_the_empty_partition_has_zero_rows() -> None:
    part = numbered(["only"])[0]
    features, labels = part.to_numpy()
    assert len(part) == 0
    assert features.shape == (0, 1)
    assert labels.shape == (0,)


def test_partitions_may_be_empty() -> None:
    parts = numbered([])
    assert len(parts) == 0
    assert list(parts) == []
    with pytest.raises(DataError, match=r"0 partitions \(none\)"):
        parts[0]


@pytest.mark.parametrize("key", [-1, 3, 10**9])
def test_an_index_out_of_range_is_refused(key: int) -> None:
    with pytest.raises(DataError, match=rf"partition index {key} is out of range: 3 partitions"):
        numbered(["x", "y", "z"])[key]


def test_an_unknown_id_is_refused() -> None:
    with pytest.raises(DataError, match="no partition has id 'w'"):
        numbered(["x", "y", "z"])["w"]


@pytest.mark.parametrize("key", [True, 1.0, None, (1,)])
def test_other_keys_are_refused(key: object) -> None:
    with pytest.raises(DataError, match="taken by int position or str id"):
        numbered(["x", "y"])[key]  # type: ignore[index]


def test_repeated_ids_are_refused() -> None:
    with pytest.raises(DataError, match="unique"):
        numbered(["x", "y", "x"])


def test_the_repr_shows_the_count_and_the_first_ids() -> None:
    assert repr(numbered(["x", "y"])) == "Partitions(2: 'x', 'y')"
    assert repr(numbered([str(i) for i in range(9)])).endswith("'4', ...)")


@given(ids=st.lists(st.text(max_size=5), unique=True, max_size=20))
def test_position_and_id_agree(ids: list[str]) -> None:
    parts = numbered(ids)
    for position, name in enumerate(ids):
        assert parts.position(name) == position
        assert parts.position(position) == position
