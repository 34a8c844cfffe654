"""flwr-datasets' partitioners over arrays, DataFrames and Hugging Face datasets, seeded and cached.

Every named partitioner runs on every form of the same examples (see
conftest.py): partitions are disjoint, cover the data (shards may leave out
a remainder), are the same for the same seed, and their numpy arrays are
the source rows they name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.errors import ConfigError, DataError
from shoal.datasets import PARTITIONERS, Partitions, partition
from shoal.datasets.memory import CACHE_SIZE
from support.tabular import NUM_CLASSES, NUM_ROWS, USERS, Examples, in_form, make_columns

pytest.importorskip("flwr_datasets")

NUM_PARTITIONS = 8
OPTIONS: dict[str, dict[str, object]] = {
    "iid": {"num_partitions": NUM_PARTITIONS},
    "dirichlet": {"num_partitions": NUM_PARTITIONS, "alpha": 0.5},
    "shards": {"num_partitions": NUM_PARTITIONS, "shards_per_partition": 2},
    "pathological": {"num_partitions": NUM_PARTITIONS, "classes_per_partition": 2},
    "natural_id": {"partition_by": "user"},
    "linear": {"num_partitions": NUM_PARTITIONS},
    "exponential": {"num_partitions": 4},
}


def cut(examples: Examples, name: str, **overrides: object) -> Partitions:
    options = {**OPTIONS[name], **overrides}
    if name == "natural_id" and isinstance(examples.data, tuple):
        pytest.skip("a (features, labels) pair has no id column")
    features = None if isinstance(examples.data, tuple) else ["a", "b"]
    return partition(examples.data, partitioner=name, features=features, **options)  # type: ignore[arg-type]


def all_rows(parts: Partitions) -> npt.NDArray[np.int64]:
    return np.concatenate([part.rows for part in parts])


def test_every_name_is_covered_here() -> None:
    assert sorted(OPTIONS) == sorted(PARTITIONERS)


@pytest.mark.parametrize("name", PARTITIONERS)
def test_partitions_are_disjoint_and_cover_the_data(examples: Examples, name: str) -> None:
    parts = cut(examples, name)
    rows = all_rows(parts)
    assert len(np.unique(rows)) == rows.size  # disjoint
    assert sum(len(part) for part in parts) == rows.size
    if name == "shards":  # equal shards: the remainder (fewer rows than shards) is left out
        assert NUM_ROWS - rows.size < NUM_PARTITIONS * 2
    else:
        np.testing.assert_array_equal(np.sort(rows), np.arange(NUM_ROWS))
    assert all(len(part) > 0 for part in parts)


@pytest.mark.parametrize("name", PARTITIONERS)
def test_a_partition_holds_the_rows_it_names(examples: Examples, name: str) -> None:
    part = cut(examples, name)[1]
    features, labels = part.to_numpy()
    assert features.dtype == np.float32
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(features, examples.features[part.rows].astype(np.float32))
    np.testing.assert_array_equal(labels, examples.labels[part.rows])


@pytest.mark.parametrize("name", PARTITIONERS)
def test_the_same_seed_gives_the_same_partitions(examples: Examples, name: str) -> None:
    first = cut(examples, name, seed=7, cache=False)
    again = cut(examples, name, seed=7, cache=False)
    assert first is not again
    assert first.ids == again.ids
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "pathological", "linear"])
def test_another_seed_gives_other_partitions(examples: Examples, name: str) -> None:
    first, other = cut(examples, name, seed=1), cut(examples, name, seed=2)
    assert not np.array_equal(first[0].rows, other[0].rows)


def label_skew(parts: Partitions, labels: npt.NDArray[np.int64]) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    overall = np.bincount(labels, minlength=NUM_CLASSES) / labels.size
    distances = []
    for part in parts:
        mix = np.bincount(labels[part.rows], minlength=NUM_CLASSES) / len(part)
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_dirichlet_skew_grows_as_alpha_shrinks(examples: Examples) -> None:
    skewed = label_skew(cut(examples, "dirichlet", alpha=0.05), examples.labels)
    mixed = label_skew(cut(examples, "dirichlet", alpha=1000.0), examples.labels)
    assert skewed > 0.5
    assert mixed < 0.15


def test_pathological_gives_each_partition_its_classes(examples: Examples) -> None:
    for part in cut(examples, "pathological"):
        assert len(np.unique(examples.labels[part.rows])) <= 2


def test_natural_id_groups_rows_by_id(examples: Examples) -> None:
    parts = cut(examples, "natural_id")
    assert parts.ids == tuple(sorted(USERS))
    for part in parts:
        assert set(examples.users[part.rows]) == {part.id}
    ann = np.flatnonzero(examples.users == "ann")
    np.testing.assert_array_equal(np.sort(parts["ann"].rows), ann)


def test_linear_and_exponential_sizes_grow_with_the_index(examples: Examples) -> None:
    linear = [len(part) for part in cut(examples, "linear")]
    exponential = [len(part) for part in cut(examples, "exponential")]
    assert linear == sorted(linear)
    assert exponential == sorted(exponential)
    assert exponential[-1] > 2 * exponential[-2]


def test_without_shuffle_iid_cuts_contiguous_ranges() -> None:
    features, labels, _ = make_columns(num_rows=40)
    parts = partition((features, labels), partitioner="iid", num_partitions=4, shuffle=False)
    np.testing.assert_array_equal(parts[1].rows, np.arange(10, 20))


def test_image_columns_keep_their_shape() -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(30, 4, 4)), rng.integers(0, 3, 30)
    features, _ = partition((images, labels), partitioner="iid", num_partitions=3)[0].to_numpy()
    assert features.shape == (10, 4, 4)


def test_default_features_are_the_other_columns(examples: Examples) -> None:
    if isinstance(examples.data, tuple):
        pytest.skip("a pair has one feature array")
    parts = partition(examples.data, partitioner="natural_id", partition_by="user")
    features, _ = parts[0].to_numpy()
    assert features.shape[1] == 2  # a and b; not the label, not the id


@settings(max_examples=25, deadline=None)
@given(num_rows=st.integers(1, 120), data=st.data(), seed=st.integers(0, 2**32))
def test_iid_is_a_balanced_disjoint_cover(num_rows: int, data: st.DataObject, seed: int) -> None:
    num_partitions = data.draw(st.integers(1, num_rows))
    features, labels, _ = make_columns(num_rows=num_rows, seed=seed % 1000)
    parts = partition(
        (features, labels),
        partitioner="iid",
        num_partitions=num_partitions,
        seed=seed,
        cache=False,
    )
    np.testing.assert_array_equal(np.sort(all_rows(parts)), np.arange(num_rows))
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.integers(0, 6), min_size=2, max_size=150),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_dirichlet_is_a_disjoint_cover(
    labels: list[int], alpha: float, seed: int, data: st.DataObject
) -> None:
    num_partitions = data.draw(st.integers(1, min(6, len(labels))))
    y = np.array(labels)
    parts = partition(
        (np.arange(y.size, dtype=np.float64), y),
        partitioner="dirichlet",
        num_partitions=num_partitions,
        alpha=alpha,
        min_partition_size=0,
        seed=seed,
        cache=False,
    )
    np.testing.assert_array_equal(np.sort(all_rows(parts)), np.arange(y.size))
    for part in parts:
        np.testing.assert_array_equal(part.to_numpy()[1], y[part.rows])


def test_a_partitioner_instance_is_used_as_built() -> None:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    features, labels, users = make_columns()
    data = in_form("dataframe", features, labels, users)
    parts = partition(data, partitioner=NaturalIdPartitioner(partition_by="user"), features=["a"])
    assert parts.ids == tuple(sorted(USERS))


def test_a_partitioner_instance_takes_no_options_and_serves_once() -> None:
    from flwr_datasets.partitioner import IidPartitioner

    features, labels, _ = make_columns()
    used = IidPartitioner(num_partitions=3)
    assert len(partition((features, labels), partitioner=used)) == 3
    with pytest.raises(ConfigError, match="already holds a dataset"):
        partition((features, labels), partitioner=used)
    with pytest.raises(ConfigError, match="carries its own options"):
        partition((features, labels), partitioner=IidPartitioner(num_partitions=3), alpha=0.1)
    with pytest.raises(ConfigError, match="must be a name or a flwr_datasets"):
        partition((features, labels), partitioner=object())


def test_the_cache_returns_the_same_partitions_for_the_same_objects() -> None:
    features, labels, _ = make_columns()
    first = partition((features, labels), partitioner="iid", num_partitions=3)
    assert partition((features, labels), partitioner="iid", num_partitions=3) is first
    assert partition((features, labels), partitioner="iid", num_partitions=4) is not first
    assert partition((features.copy(), labels), partitioner="iid", num_partitions=3) is not first
    assert (
        partition((features, labels), partitioner="iid", num_partitions=3, cache=False) is not first
    )


def test_the_cache_keeps_only_the_last_few() -> None:
    features, labels, _ = make_columns()
    first = partition((features, labels), partitioner="iid", num_partitions=2)
    for count in range(3, 3 + CACHE_SIZE):
        partition((features, labels), partitioner="iid", num_partitions=count)
    assert partition((features, labels), partitioner="iid", num_partitions=2) is not first


BAD_OPTIONS = [
    ({"partitioner": "zipf", "num_partitions": 2}, ConfigError, "unknown partitioner 'zipf'"),
    ({"partitioner": "iid"}, ConfigError, "partitioner='iid' needs num_partitions"),
    ({"partitioner": "iid", "num_partitions": 0}, ConfigError, "num_partitions must be"),
    ({"partitioner": "iid", "num_partitions": True}, ConfigError, "num_partitions must be"),
    ({"partitioner": "iid", "num_partitions": 2, "alpha": 0.5}, ConfigError, "alpha applies to"),
    ({"partitioner": "dirichlet", "num_partitions": 2, "alpha": 0.0}, ConfigError, "alpha must"),
    ({"partitioner": "dirichlet", "num_partitions": 2, "alpha": float("nan")}, ConfigError,
     "alpha must"),
    ({"partitioner": "dirichlet", "num_partitions": 2, "min_partition_size": -1}, ConfigError,
     "min_partition_size must"),
    ({"partitioner": "shards", "num_partitions": 2, "shards_per_partition": 0}, ConfigError,
     "shards_per_partition must"),
    ({"partitioner": "shards", "num_partitions": 2, "classes_per_partition": 2}, ConfigError,
     "classes_per_partition applies to partitioner='pathological'"),
    ({"partitioner": "natural_id"}, ConfigError, "needs partition_by"),
    ({"partitioner": "natural_id", "partition_by": "user", "num_partitions": 3}, ConfigError,
     "drop num_partitions"),
    ({"partitioner": "iid", "num_partitions": 2, "seed": -1}, ConfigError, "seed must be"),
    ({"partitioner": "iid", "num_partitions": 2, "seed": 1.5}, ConfigError, "seed must be"),
    ({"partitioner": "iid", "num_partitions": NUM_ROWS + 1}, DataError, "cannot make 401"),
    ({"partitioner": "iid", "num_partitions": 2, "label": "y"}, DataError,
     "no label column 'y' \\(columns: a, b, label, user\\)"),
    ({"partitioner": "iid", "num_partitions": 2, "features": ["a", "zz"]}, DataError,
     "no feature column 'zz'"),
    ({"partitioner": "iid", "num_partitions": 2, "features": []}, DataError, "no feature columns"),
    ({"partitioner": "iid", "num_partitions": 2, "features": ["a", "label"]}, DataError,
     "cannot also be a feature"),
    ({"partitioner": "iid", "num_partitions": 2, "features": ["a", "user"]}, DataError,
     "column 'user' is not numeric"),
    ({"partitioner": "natural_id", "partition_by": "group"}, DataError, "no column 'group'"),
    ({"partitioner": "dirichlet", "num_partitions": 4, "min_partition_size": 150}, DataError,
     "flwr-datasets cannot partition the data"),
    ({"partitioner": "exponential", "num_partitions": 20}, DataError,
     "flwr-datasets cannot partition the data"),
]  # fmt: skip


@pytest.mark.parametrize("kind", ["mapping", "dataframe", "hf_dataset"])
@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS)
def test_bad_requests_get_one_clear_error(
    kind: str, options: dict[str, object], error: type[Exception], message: str
) -> None:
    data = in_form(kind, *make_columns())
    options = {"features": ["a", "b"], **options}
    with pytest.raises(error, match=message):
        partition(data, **options)  # type: ignore[arg-type]


BAD_DATA = [
    ((np.zeros((3, 2)), np.zeros(3), np.zeros(3)), "a \\(features, labels\\) pair, got 3"),
    ((np.zeros((3, 2)), np.arange(4)), "one row per example"),
    ({}, "no columns"),
    ([1, 2, 3], "got list"),
    ((np.zeros((0, 2)), np.zeros(0, dtype=np.int64)), "the data has no rows"),
    ((np.zeros((3, 2)), np.array(["a", "b", "c"])), "column 'label' is not numeric"),
    ({"x": np.zeros(3), "label": np.arange(3), "__shoal_row__": np.arange(3)}, "reserves"),
    ((np.full((4, 2), np.nan), np.arange(4)), "holds NaN or infinite values"),
]


@pytest.mark.parametrize(("data", "message"), BAD_DATA)
def test_bad_data_gets_one_clear_error(data: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        partition(data, partitioner="iid", num_partitions=2, cache=False)[0].to_numpy()


def test_dataframe_quirks_are_named() -> None:
    pd = pytest.importorskip("pandas")
    numbered = pd.DataFrame({0: [1.0, 2.0], "label": [0, 1]})
    with pytest.raises(DataError, match="column names must be text, got 0"):
        partition(numbered, partitioner="iid", num_partitions=2)
    missing = pd.DataFrame({"a": pd.array([1, None, 3], dtype="Int64"), "label": [0, 1, 0]})
    parts = partition(missing, partitioner="iid", num_partitions=1, shuffle=False)
    with pytest.raises(DataError, match="column 'a' has missing values"):
        parts[0].to_numpy()


def test_the_index_of_a_dataframe_does_not_matter() -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": [10.0, 20.0, 30.0], "label": [0, 1, 2]}, index=[7, 3, 5])
    part = partition(frame, partitioner="iid", num_partitions=1, shuffle=False)[0]
    np.testing.assert_array_equal(part.to_numpy()[1], [0, 1, 2])


def test_a_hugging_face_split_with_an_index_mapping_works() -> None:
    datasets = pytest.importorskip("datasets")
    features, labels, _ = make_columns()
    table = datasets.Dataset.from_dict({"x": features.tolist(), "label": labels.tolist()})
    train = table.train_test_split(test_size=0.25, seed=0)["train"]  # selects through indices
    part = partition(train, partitioner="dirichlet", num_partitions=3, alpha=1.0)[2]
    x, y = part.to_numpy()
    assert x.shape == (len(part), 2)
    np.testing.assert_array_equal(y, np.asarray(train.with_format("numpy")["label"])[part.rows])


ANOTHER_PROCESS = """
import numpy as np
from shoal.datasets import partition
from support.tabular import in_form, make_columns

parts = partition(in_form({kind!r}, *make_columns()), partitioner={name!r}, seed=11, **{options!r})
print(",".join(map(str, parts[{index}].rows.tolist())))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "name"), [("mapping", "dirichlet"), ("hf_dataset", "natural_id")])
def test_another_process_gets_the_same_partition(kind: str, name: str) -> None:
    options = {**OPTIONS[name], "features": ["a", "b"]}
    script = ANOTHER_PROCESS.format(kind=kind, name=name, options=options, index=2)
    tests = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": f"{tests.parent / 'src'}{os.pathsep}{tests}", "PYTHONHASHSEED": "123"},
        timeout=300,
    )
    here = partition(in_form(kind, *make_columns()), partitioner=name, seed=11, **options)  # type: ignore[arg-type]
    assert result.stdout.strip() == ",".join(map(str, here[2].rows.tolist()))
