"""Partition a centralized dataset among simulated clients: IID, Dirichlet, shards, power law.

Every function returns one sorted int64 index array per client; together they
cover every example exactly once. Randomness comes only from the
``np.random.Generator`` passed in. An impossible request (more clients than
examples, a non-positive concentration, ...) raises :class:`DataError`.

These stay beside :mod:`shoal.datasets`, which partitions a user's own
arrays, DataFrames and Hugging Face datasets with flwr-datasets, because
they need no extra: the core install and the embedded default run
(``make run``) use them on the simulator's built-in datasets. They work on
counts and label arrays alone, with no Arrow table and no ``datasets``
import, and every example lands in exactly one part (flwr-datasets' shards
drop a remainder). ``partition_power_law`` (Zipf sizes) has no flwr-datasets
twin. Populations too large to hold as one dataset are not partitioned at
all: ``SyntheticFederation`` generates each device's data lazily. For your
own data, use :func:`shoal.datasets.partition`.

>>> rng = np.random.default_rng(0)
>>> parts = partition_iid(num_examples=10, num_clients=3, rng=rng)
>>> [len(part) for part in parts]
[4, 3, 3]
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from shoal.core.errors import DataError

IndexArray = npt.NDArray[np.int64]


def partition_iid(
    *, num_examples: int, num_clients: int, rng: np.random.Generator
) -> list[IndexArray]:
    """Shuffle the examples and deal them into ``num_clients`` parts of near-equal size."""
    _check_counts(num_examples, num_clients, min_size=1)
    return _split_by_sizes(rng.permutation(num_examples), _equal_sizes(num_examples, num_clients))


def partition_dirichlet(
    labels: npt.ArrayLike,
    *,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_attempts: int = 100,
) -> list[IndexArray]:
    """Label skew (Hsu et al. 2019): each class is spread over clients by Dir(alpha) shares.

    Small ``alpha`` gives each client few classes; large ``alpha`` gives every
    client close to the global label mix. Draws are repeated until every
    client has at least ``min_size`` examples; after ``max_attempts`` failed
    draws a :class:`DataError` says so.
    """
    label_array = _check_labels(labels)
    _check_counts(label_array.size, num_clients, min_size=min_size)
    if not (math.isfinite(alpha) and alpha > 0):
        raise DataError(f"alpha must be a positive finite number, got {alpha}")
    if max_attempts < 1:
        raise DataError(f"max_attempts must be >= 1, got {max_attempts}")
    by_class = [rng.permutation(np.flatnonzero(label_array == c)) for c in np.unique(label_array)]
    for _ in range(max_attempts):
        counts = _dirichlet_counts([part.size for part in by_class], num_clients, alpha, rng)
        if counts.sum(axis=0).min() >= min_size:
            return _gather_by_class(by_class, counts)
    raise DataError(
        f"no Dirichlet(alpha={alpha}) draw in {max_attempts} attempts gave each of "
        f"{num_clients} clients at least {min_size} examples: raise alpha or lower min_size"
    )


def partition_shards(
    labels: npt.ArrayLike,
    *,
    num_clients: int,
    shards_per_client: int = 2,
    rng: np.random.Generator,
) -> list[IndexArray]:
    """Pathological non-IID split of the FedAvg paper (McMahan et al. 2017).

    Sort the examples by label (ties in random order), cut them into
    ``num_clients * shards_per_client`` contiguous shards of near-equal size
    and give each client ``shards_per_client`` shards at random.
    """
    label_array = _check_labels(labels)
    if shards_per_client < 1:
        raise DataError(f"shards_per_client must be >= 1, got {shards_per_client}")
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    num_shards = num_clients * shards_per_client
    _check_counts(label_array.size, num_shards, min_size=1)
    shuffled = rng.permutation(label_array.size)
    by_label = shuffled[np.argsort(label_array[shuffled], kind="stable")]
    shards = _split_by_sizes(by_label, _equal_sizes(label_array.size, num_shards))
    owners = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in owners]


def partition_power_law(
    *,
    num_examples: int,
    num_clients: int,
    exponent: float,
    min_size: int = 1,
    rng: np.random.Generator,
) -> list[IndexArray]:
    """Quantity skew: client sizes follow a Zipf law, ``size ~ rank ** -exponent``.

    Each client first gets ``min_size`` examples; the rest are shared in
    proportion to ``rank ** -exponent`` (largest-remainder rounding), ranks
    being assigned to clients at random. ``exponent=0`` gives equal sizes.
    """
    _check_counts(num_examples, num_clients, min_size=min_size)
    if not (math.isfinite(exponent) and exponent >= 0):
        raise DataError(f"exponent must be a finite number >= 0, got {exponent}")
    weights = np.arange(1, num_clients + 1, dtype=np.float64) ** -exponent
    extra = _largest_remainder(weights / weights.sum(), num_examples - num_clients * min_size)
    sizes = min_size + extra[rng.permutation(num_clients)]
    return _split_by_sizes(rng.permutation(num_examples), sizes)


def _dirichlet_counts(
    class_sizes: list[int], num_clients: int, alpha: float, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """A (classes, clients) matrix of example counts, each row a Dir(alpha) split."""
    shares = rng.dirichlet(np.full(num_clients, alpha), size=len(class_sizes))
    # Tiny alphas can underflow a whole row to zeros or NaNs; fall back to one client.
    broken = ~np.isfinite(shares).all(axis=1) | (shares.sum(axis=1) <= 0)
    if broken.any():
        shares[broken] = np.eye(num_clients)[rng.integers(num_clients, size=int(broken.sum()))]
    return np.stack(
        [_largest_remainder(row, size) for row, size in zip(shares, class_sizes, strict=True)]
    )


def _gather_by_class(by_class: list[IndexArray], counts: npt.NDArray[np.int64]) -> list[IndexArray]:
    """Each client's indices: its count of each class, cut from that class's shuffled list."""
    pieces = [_split_by_sizes(indices, row) for indices, row in zip(by_class, counts, strict=True)]
    return [np.sort(np.concatenate([piece[c] for piece in pieces])) for c in range(counts.shape[1])]


def _largest_remainder(shares: npt.NDArray[np.float64], total: int) -> npt.NDArray[np.int64]:
    """Integers proportional to ``shares`` that sum exactly to ``total``."""
    exact = shares / shares.sum() * total
    counts: npt.NDArray[np.int64] = np.floor(exact).astype(np.int64)
    shortfall = total - int(counts.sum())
    if shortfall > 0:
        counts[np.argsort(counts - exact, kind="stable")[:shortfall]] += 1
    return counts


def _equal_sizes(total: int, parts: int) -> npt.NDArray[np.int64]:
    sizes = np.full(parts, total // parts, dtype=np.int64)
    sizes[: total % parts] += 1
    return sizes


def _split_by_sizes(
    indices: npt.NDArray[np.integer], sizes: npt.NDArray[np.int64]
) -> list[IndexArray]:
    bounds = np.cumsum(sizes)[:-1]
    return [np.sort(part).astype(np.int64, copy=False) for part in np.split(indices, bounds)]


def _check_labels(labels: npt.ArrayLike) -> npt.NDArray[np.int64]:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_counts(num_examples: int, num_clients: int, *, min_size: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_examples < 0:
        raise DataError(f"num_examples must be >= 0, got {num_examples}")
    if min_size < 0:
        raise DataError(f"min_size must be >= 0, got {min_size}")
    needed = num_clients * max(min_size, 1)
    if needed > num_examples:
        raise DataError(
            f"{num_examples} examples cannot give {num_clients} parts "
            f"at least {max(min_size, 1)} example(s) each"
        )
