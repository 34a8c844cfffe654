"""Drift of a round's updates: a 2-D projection of them, their clusters, and how well apart.

Each plaintext fit round, the counted updates (the ones the divergence
measure sees, sampled the same way for large models) are projected to two
dimensions (PCA by default, t-SNE on request) for the run's report, and
clustered by k-means on their directions (each update scaled to unit
length, so that a client's step size does not make it a cluster of its
own), with k chosen in ``2..max_clusters`` by the silhouette score. A
silhouette at or above ``bimodal_threshold`` flags a population of distinct
groups (*bimodal*: two or more), the case clustered FL is for.

Under secure aggregation no single update is seen: :meth:`DriftReport.unavailable`
says so, as the divergence report does.

>>> rng = np.random.default_rng(0)
>>> day, night = rng.normal(size=(2, 50))
>>> updates = np.array([day + 0.1 * rng.normal(size=50) for _ in range(6)]
...     + [night + 0.1 * rng.normal(size=50) for _ in range(6)], np.float32)
>>> report = measure_drift([f"c{i}" for i in range(12)], updates)
>>> report.clusters, report.bimodal
(2, True)
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.linalg import lapack  # type: ignore[import-untyped]

from shoal.aggregation.divergence import FloatMatrix, sample_coordinates
from shoal.core.errors import StrategyError
from shoal.core.later import Later, Offload, Ready, here
from shoal.core.pickling import pickled_by_fields

DriftMethod = Literal["pca", "tsne"]
DRIFT_METHODS: tuple[str, ...] = ("pca", "tsne")
Points = npt.NDArray[np.float64]
Rows = npt.NDArray[np.floating[Any]]  # updates' rows, float32 or float64
CLUSTER_AXES = 8
"""The principal axes the clustering sees (all of them for a round of fewer clients)."""
EXACT_UP_TO = 32
"""Rounds of up to this many clients get the exact eigendecomposition (it is as fast)."""
OVERSAMPLE = 8
POWER_STEPS = 3
"""The randomized subspace iteration's extra columns and power steps. Where the leading axes
stand out (distinct populations) they come out as the exact ones; in a population without
groups the spectrum is flat, the leading axes are one choice among near-equal ones (their
variances within about 7% of the exact), and the silhouette is as low either way (rounds of
100 digits clients: 0.095 to 0.12, exact and randomized alike)."""
POINT_DECIMALS = 6
"""The projection's points are kept to this many decimals (they lie within [-1, 1]): a
picture's precision, and a round's record in ``drift.jsonl`` a third shorter to write."""
SEED_STRIDE, SEED_STREAM = 1 << 20, 0xD71F7
"""The k-means seeding's generator is seeded with ``seed * SEED_STRIDE + SEED_STREAM``."""
LISTS_UP_TO = 32
"""Rounds of up to this many clients are seeded over Python lists, larger ones in numpy. A
numpy call costs microseconds whatever its size, three to four times more inside a round
(whose other work has pushed numpy's code out of the caches) than alone; a few values'
arithmetic in the interpreter, which the round keeps running, costs less."""
TIE = 1e-9
"""Candidate seeds whose totals differ by less than this share are tied (the first is taken)."""
SENT_WHOLE_UP_TO = 1 << 16
"""Updates of up to this many values (sampled) go whole to an offload's other process, which
makes their Gram matrix too; larger ones' Gram matrix (n x n) is made here and sent instead.
Measured alone: at 64K values (100 x 655) the rows' norms and Gram took 285 us here, sending
the rows 73 us more than sending the Gram; at 200K, 764 us against 590 us more; at 650K the
rows took 5.3 ms to send (in a round, the product here costs three times more than alone)."""
MAX_ITERATIONS = 30
"""Lloyd's steps at most: groups that are there separate in a few; a population without
groups (where more steps would go on moving points) scores a low silhouette either way."""


@pickled_by_fields  # to a simulation's worker each round, its report back
@dataclass(frozen=True, slots=True)
class DriftRule:
    """How a round's drift is measured.

    ``method``: the projection (``pca`` or ``tsne``); ``max_clusters``: the
    largest k tried; ``bimodal_threshold``: the silhouette at or above which
    the population counts as distinct groups; ``min_clients``: fewer updates
    are projected but not clustered (a silhouette needs k + 1 points at
    least); ``max_values``: as the divergence rule's.
    """

    method: DriftMethod = "pca"
    max_clusters: int = 4
    bimodal_threshold: float = 0.3
    min_clients: int = 4
    max_values: int = 1 << 20  # a picture of the population: a sample of coordinates will do

    def __post_init__(self) -> None:
        if self.method not in DRIFT_METHODS:
            raise StrategyError(f"unknown drift method {self.method!r}: choose pca or tsne")
        if self.max_clusters < 2:
            raise StrategyError(f"max_clusters must be at least 2, got {self.max_clusters}")
        if not (math.isfinite(self.bimodal_threshold) and -1 <= self.bimodal_threshold <= 1):
            raise StrategyError(
                f"bimodal_threshold must be in [-1, 1], got {self.bimodal_threshold}"
            )
        if self.min_clients < 3 or self.max_values < 1:
            raise StrategyError("min_clients must be at least 3 and max_values at least 1")


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class DriftReport:
    """A round's drift: the projection and clustering of its updates, or why none exists."""

    clients: tuple[str, ...] = ()
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    method: str = "pca"
    explained_variance: tuple[float, float] | None = None  # PCA: each axis's share
    clusters: int = 1
    separation: float | None = None  # the chosen clustering's silhouette
    bimodal: bool = False
    reason: str | None = None
    # the record's members other than its round and clients, as JSON text, made where the
    # drift was measured (a simulation's worker): "" to encode them from the fields
    encoded: str = field(default="", compare=False, repr=False)

    @classmethod
    def unavailable(cls, reason: str) -> DriftReport:
        return cls(reason=reason)

    @property
    def available(self) -> bool:
        return self.reason is None

    def row_fields(self) -> dict[str, Any]:
        """The round's drift for its metrics row."""
        if not self.available:
            return {"drift_available": False, "drift_reason": self.reason}
        return {
            "drift_available": True,
            "drift_clusters": self.clusters,
            "drift_separation": self.separation,
            "drift_bimodal": self.bimodal,
        }

    def record_line(self, round_number: int, names: Sequence[str]) -> str:
        """The round's record in ``drift.jsonl``, its clients called ``names`` (in order), as
        one line of JSON, its keys in order (``clients``, ``explained_variance``, ``labels``,
        ``method``, ``points``, ``round``): the members measured elsewhere come encoded there
        (:attr:`encoded`), so that the coordinator's own thread writes only the round and the
        clients' names around them."""
        members = self.encoded or _record_members(
            self.method, self.points, self.labels, self.explained_variance
        )
        return f'{{"clients": {_JSON.encode(list(names))}, {members}, "round": {round_number}}}'


_JSON = json.JSONEncoder(allow_nan=False)  # made once, not per record


def _record_members(
    method: str,
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
    explained: Sequence[float] | None,
) -> str:
    """The JSON members of a drift record between its clients and its round, in key order."""
    return (
        f'"explained_variance": {_JSON.encode(None if explained is None else list(explained))}, '
        f'"labels": {_JSON.encode(list(labels))}, "method": {_JSON.encode(method)}, '
        f'"points": {_JSON.encode(points)}'
    )


def measure_drift(
    client_ids: Sequence[str],
    updates: FloatMatrix,
    *,
    rule: DriftRule | None = None,
    seed: int = 0,
) -> DriftReport:
    """The projection and clustering of ``updates`` (one row per client in ``client_ids``)."""
    return drift_later(client_ids, updates, rule=rule, seed=seed).result()


def drift_later(
    client_ids: Sequence[str],
    updates: FloatMatrix,
    *,
    rule: DriftRule | None = None,
    seed: int = 0,
    offload: Offload = here,
) -> Later[DriftReport]:
    """:func:`measure_drift`, whose work past the updates' Gram matrix is ``offload``'s: the
    one product with the model's width is made here, where the updates are, and the rest
    (the projection, the clustering, their scores), which reads an n x n matrix alone, may
    run elsewhere (a simulation's idle worker) while this process goes on."""
    rule = rule or DriftRule()
    count = len(client_ids)
    if updates.ndim != 2 or updates.shape[0] != count:
        raise StrategyError("drift needs one update row per client")
    if count == 0:
        return Ready(DriftReport(method=rule.method))
    columns = sample_coordinates(updates, max_values=rule.max_values, seed=seed)
    # float32 through the one product with the model's width; float64 from the n x n Gram on
    matrix = (updates if columns is None else updates[:, columns]).astype(np.float32, copy=False)
    if sent_together(matrix):
        return offload(drift_of_rows, tuple(client_ids), matrix, rule, seed)
    return offload(drift_of_gram, tuple(client_ids), gram_of(unit_rows(matrix)), rule, seed)


def sent_together(updates: Rows) -> bool:
    """Whether the updates are few enough values (:data:`SENT_WHOLE_UP_TO`) to go to another
    process as they are."""
    return updates.size <= SENT_WHOLE_UP_TO


def drift_of_rows(
    client_ids: Sequence[str], matrix: Rows, rule: DriftRule, seed: int
) -> DriftReport:
    """The drift of the updates ``matrix`` (one row per client, float32)."""
    return drift_of_gram(client_ids, gram_of(unit_rows(matrix)), rule, seed)


def drift_of_gram(
    client_ids: Sequence[str], gram: Points, rule: DriftRule, seed: int
) -> DriftReport:
    """The drift of the updates whose directions' Gram matrix is ``gram`` (:func:`gram_of`
    of their :func:`unit_rows`)."""
    count = len(client_ids)
    # the rows in their principal axes: with t-SNE, every axis (every pairwise distance
    # kept); with PCA, the leading ones the plot and the clustering read
    axes = None if rule.method == "tsne" else CLUSTER_AXES
    coordinates, variance, total = gram_coordinates(gram, axes=axes, seed=seed)
    points: Points = coordinates[:, :2]
    shares = [float(v / total) if total > 0 else 0.0 for v in variance[:2]] + [0.0, 0.0]
    explained: tuple[float, float] | None = (shares[0], shares[1])
    if rule.method == "tsne" and count > 2:
        points, explained = tsne(coordinates, seed=seed), None
    # one call rounds and lists them all; a round of fewer than two axes sits at 0 on the rest
    listed = points.round(POINT_DECIMALS).tolist()
    if points.shape[1] < 2:
        listed = [[*point, 0.0, 0.0][:2] for point in listed]
    labels: list[int] = [0] * count
    separation = None
    if count >= rule.min_clients:
        # k-means on the leading axes, as PCA before k-means is usually run: the groups that
        # matter lie along the directions of most variance, and a round of many clients
        # clusters in a few dimensions instead of one per client
        leading = coordinates[:, :CLUSTER_AXES]
        labels, separation = cluster(leading, max_clusters=rule.max_clusters, seed=seed)
    return DriftReport(
        clients=tuple(client_ids),
        points=tuple(map(tuple, listed)),
        labels=tuple(labels),
        method=rule.method,
        explained_variance=explained,
        clusters=max(labels) + 1,
        separation=separation,
        bimodal=separation is not None and separation >= rule.bimodal_threshold,
        encoded=_record_members(rule.method, listed, labels, explained),
    )


def unit_rows(matrix: Rows) -> Rows:
    """Each row scaled to unit L2 length (a zero row stays zero).

    The norms are taken in float64: a poisoned float32 row of 1e30s squares past float32's
    range, and drift is measured on exactly such rounds.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))
    scale = np.divide(1.0, norms, out=np.zeros(norms.shape), where=norms > 0)
    unit: Rows = matrix * scale.astype(matrix.dtype)[:, None]
    return unit


def gram_of(matrix: Rows) -> Points:
    """The rows' Gram matrix (every two rows' dot product), in float64."""
    gram: Points = (matrix @ matrix.T).astype(np.float64)
    return gram


def gram_coordinates(
    gram: Points, *, axes: int | None = None, seed: int = 0
) -> tuple[Points, npt.NDArray[np.float64], float]:
    """The centered rows whose Gram matrix is ``gram`` (every two rows' dot product: n x n,
    changed here) in their principal axes, largest first, each axis's variance, and the
    total variance over every axis.

    Through the Gram matrix, the cost is n squared times the columns (in :func:`gram_of`),
    not the columns squared; with every axis, the coordinates keep every pairwise distance
    of the rows. The Gram matrix is centered on both sides (J G J, J the centering matrix),
    which is the centered rows' Gram matrix without a centered copy of the rows. ``axes``:
    only that many leading axes; for a round of many clients they come from a randomized
    subspace iteration (Halko, Martinsson and Tropp 2011) instead of the whole
    eigendecomposition.
    """
    count = gram.shape[0]
    means = np.add.reduce(gram, axis=0) / count
    gram -= means
    gram -= means[:, None]
    gram += float(np.add.reduce(means)) / count
    total = max(float(gram.trace()), 0.0)
    if axes is None or count <= EXACT_UP_TO:
        eigenvalues, eigenvectors = symmetric_eigenpairs(gram)
    else:
        eigenvalues, eigenvectors = _leading_eigenpairs(gram, axes=axes, seed=seed)
    largest = eigenvalues[::-1][:axes]  # descending: the axes kept are a prefix
    floor = 1e-12 * max(1.0, float(largest[0]) if largest.size else 1.0)  # and none below 0
    kept = int(np.count_nonzero(largest > floor))
    coordinates: Points = eigenvectors[:, ::-1][:, :kept] * np.sqrt(largest[:kept])
    return coordinates, largest[:kept], total


def _leading_eigenpairs(gram: Points, *, axes: int, seed: int) -> tuple[Points, Points]:
    """Close approximations of the ``axes`` largest eigenpairs of the symmetric ``gram`` (in
    ascending order, as :func:`numpy.linalg.eigh` gives them): a few power steps on a random
    block of ``axes`` plus :data:`OVERSAMPLE` columns, then the eigenpairs of ``gram`` in the
    block's span."""
    rng = np.random.default_rng([seed, 0xA5])
    block = gram @ rng.standard_normal((gram.shape[0], min(axes + OVERSAMPLE, gram.shape[0])))
    for _ in range(POWER_STEPS):
        block = gram @ orthonormal_columns(block)
    basis = orthonormal_columns(block)
    eigenvalues, small = symmetric_eigenpairs(basis.T @ gram @ basis)
    return eigenvalues[-axes:], (basis @ small)[:, -axes:]


# LAPACK straight, as numpy.linalg calls it, without numpy's checks around the call: a
# round's matrices are small, finite and ours, and the checks cost more than the arithmetic
# (SciPy's LAPACK is loaded by shoal.core.parameters already)


def symmetric_eigenpairs(matrix: Points) -> tuple[Points, Points]:
    """The eigenvalues (ascending) and eigenvectors (columns) of the symmetric ``matrix``
    (LAPACK's dsyevd, as :func:`numpy.linalg.eigh`)."""
    eigenvalues, eigenvectors, info = lapack.dsyevd(matrix, compute_v=1, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the eigendecomposition did not converge (dsyevd {info})")
    return eigenvalues, eigenvectors


def orthonormal_columns(matrix: Points) -> Points:
    """An orthonormal basis of the columns of the tall ``matrix``: the Q of its reduced QR
    factorization (LAPACK's dgeqrf and dorgqr, as :func:`numpy.linalg.qr`)."""
    factors, reflectors, _, info = lapack.dgeqrf(matrix)
    if info == 0:
        basis, _, info = lapack.dorgqr(factors[:, : matrix.shape[1]], reflectors)
    if info != 0:
        raise np.linalg.LinAlgError(f"the QR factorization failed (LAPACK {info})")
    orthonormal: Points = basis
    return orthonormal


def tsne(matrix: Points, *, seed: int) -> Points:
    """A t-SNE embedding of the rows in 2-D (scikit-learn's)."""
    from sklearn.manifold import TSNE

    count = matrix.shape[0]
    embedding = TSNE(
        n_components=2, perplexity=min(30.0, (count - 1) / 3), init="random", random_state=seed
    )
    points: Points = np.asarray(embedding.fit_transform(matrix), np.float64)
    return points


def cluster(matrix: Points, *, max_clusters: int, seed: int) -> tuple[list[int], float | None]:
    """k-means labels of the rows with k in ``2..max_clusters`` chosen by the silhouette score,
    and that score (None, one cluster: the rows are too few or all alike).

    One greedy k-means++ seeding, one Lloyd run per k, as scikit-learn's ``n_init="auto"``:
    where groups stand apart, the seeding finds each of them; where none are, more runs
    buy a lower inertia, not a higher silhouette."""
    count = matrix.shape[0]
    squared = squared_distances(matrix)
    distances = np.sqrt(squared)
    # k-means needs k distinct rows: a row at no distance from an earlier one adds none
    distinct = count
    if np.count_nonzero(distances <= 1e-9) > count:  # more than the diagonal
        distinct -= int(np.triu(distances <= 1e-9, 1).any(axis=0).sum())
    candidates = list(range(2, min(max_clusters, count - 1, distinct) + 1))
    if not candidates:
        return [0] * count, None
    seeds = _seeds(squared, clusters=candidates[-1], seed=seed)
    # runs that fell to one cluster (all rows alike) score nothing
    runs = _kmeans_runs(matrix, candidates, seeds)
    runs = runs[np.minimum.reduce(runs, axis=1) != np.maximum.reduce(runs, axis=1)]
    if not len(runs):
        return [0] * count, None
    scores = silhouettes(distances, runs)
    best = int(scores.argmax())  # the first of equal scores: the fewest clusters
    return _by_size(runs[best].tolist()), float(scores[best])


def pairwise_distances(matrix: Points) -> Points:
    """The Euclidean distance between every two rows."""
    distances: Points = np.sqrt(squared_distances(matrix))
    return distances


def squared_distances(matrix: Points) -> Points:
    """The squared Euclidean distance between every two rows (zero on the diagonal)."""
    gram = matrix @ matrix.T
    squares = gram.diagonal().copy()
    gram *= -2.0
    gram += squares
    gram += squares[:, None]
    squared: Points = np.maximum(gram, 0.0, out=gram)
    squared.flat[:: squared.shape[0] + 1] = 0.0
    return squared


def _kmeans_runs(matrix: Points, ks: Sequence[int], seeds: Sequence[int]) -> npt.NDArray[np.int64]:
    """k-means for each k of ``ks``, each from the first k of ``seeds`` (greedy k-means++ is
    sequential: its first k seeds are a k-means++ seeding for k), every run side by side as
    one array each Lloyd step: a round's few points cost calls, not arithmetic. A run of
    fewer clusters than the largest k holds the extra centers at an infinite distance, so
    that no point ever joins them. The labels, one row per k."""
    unused, pad, identity = _runs_frame(tuple(ks))
    centers = matrix[list(seeds)][None]  # every run's first centers: broadcast, not copied
    doubled = -2.0 * matrix.T  # (times 2 is exact: the products are as -2 times the product)
    labels = np.full((len(ks), matrix.shape[0]), -1, np.int64)
    for _ in range(MAX_ITERATIONS):
        # a row's squared distance to each center, less its own squared length (the same
        # for every center: the nearest is the same); (runs, clusters, points)
        gaps = centers @ doubled + (np.add.reduce(centers * centers, axis=2)[:, :, None] + unused)
        moved_to = gaps.argmin(axis=1)
        if moved_to.tobytes() == labels.tobytes():  # two copies cost less than two ufuncs
            break  # no point changed cluster in any run: Lloyd's iteration has converged
        labels = moved_to
        one_hot = identity[labels]  # (runs, points, clusters)
        # (runs, clusters, 1), a run's centers past its k counted one (their place is unused)
        counts = np.add.reduce(one_hot, axis=1)[:, :, None] + pad
        sums = one_hot.transpose(0, 2, 1) @ matrix  # (runs, clusters, columns)
        if counts.all():
            centers = sums / counts
        else:  # a cluster left empty keeps its center
            centers = np.where(counts > 0, sums / np.maximum(counts, 1), centers)
    return labels


@functools.lru_cache(maxsize=16)
def _runs_frame(ks: tuple[int, ...]) -> tuple[Points, Points, Points]:
    """For runs of ``ks`` clusters side by side: what each run adds to its distance to each
    center (infinity past its k; runs, clusters, 1), what it adds to each cluster's count
    (one past its k: no such center is ever empty), and the identity of the largest k.
    Read only: one per ``ks``, kept."""
    widest = max(ks)
    unused = np.array([[0.0] * k + [np.inf] * (widest - k) for k in ks])[:, :, None]
    pad = np.array([[0.0] * k + [1.0] * (widest - k) for k in ks])[:, :, None]
    unused.flags.writeable = pad.flags.writeable = False
    return unused, pad, _identity(widest)


def _seeds(squared: Points, *, clusters: int, seed: int) -> list[int]:
    """Greedy k-means++ (Arthur and Vassilvitskii 2007, section 5; scikit-learn's seeding):
    the ``clusters`` rows chosen as seeds, in order. Each next seed is the best of a few
    candidates, each drawn in proportion to its squared distance (``squared``, between every
    two rows) from the nearest seed so far: the one that leaves the least total squared
    distance to the nearest seed. One draw per seed (plain k-means++) puts two seeds in one
    of three well-apart groups about once in 25 seedings. The draws come from Python's
    generator seeded with an integer from ``seed`` (a text seed is hashed with SHA-512 first,
    whose code a round keeps cold)."""
    count = squared.shape[0]
    trials = 2 + int(math.log(clusters))
    rng = random.Random(seed * SEED_STRIDE + SEED_STREAM)
    draws = [[rng.random() for _ in range(trials)] for _ in range(clusters)]
    chosen = min(int(draws[0][0] * count), count - 1)
    if count <= LISTS_UP_TO:
        return _seeds_listed(squared.tolist(), chosen, draws[1:])
    return _seeds_numpy(squared, chosen, np.array(draws[1:]))


def _seeds_listed(rows: list[list[float]], first: int, draws: list[list[float]]) -> list[int]:
    """:func:`_seeds` after the ``first`` seed, over Python lists (a round of few clients)."""
    count = len(rows)
    chosen = [first]
    nearest = rows[first]
    for candidates in draws:
        cumulative = list(itertools.accumulate(nearest))
        total = cumulative[-1]
        if total > 0:  # numpy's searchsorted(side="right") of each draw
            picked = [bisect.bisect_right(cumulative, draw * total) for draw in candidates]
        else:  # every row at no distance from a seed: uniform draws
            picked = [int(draw * count) for draw in candidates]
        picked = [min(pick, count - 1) for pick in picked]
        left = [sum(map(min, nearest, rows[pick])) for pick in picked]
        best = picked[_first_least(left)]
        chosen.append(best)
        nearest = list(map(min, nearest, rows[best]))
    return chosen


def _seeds_numpy(squared: Points, first: int, draws: Points) -> list[int]:
    """:func:`_seeds` after the ``first`` seed, in numpy (a round of many clients)."""
    count = squared.shape[0]
    chosen = [first]
    nearest = squared[first]
    for candidates in draws:
        cumulative = np.cumsum(nearest)
        total = float(cumulative[-1])
        if total > 0:
            picked = np.searchsorted(cumulative, candidates * total, side="right")
            picked = np.minimum(picked, count - 1)
        else:  # every row at no distance from a seed: uniform draws
            picked = np.minimum((candidates * count).astype(np.int64), count - 1)
        left = np.add.reduce(np.minimum(nearest, squared[picked]), axis=1)
        chosen.append(int(picked[_first_least(left.tolist())]))
        nearest = np.minimum(nearest, squared[chosen[-1]])
    return chosen


def _first_least(totals: Sequence[float]) -> int:
    """The first of the candidates that leave the least total, ties within rounding included:
    Python's sum and numpy's (pairwise) round the same total differently, and a tie broken
    by that rounding would make the two seedings differ."""
    least = min(totals)
    return next(i for i, total in enumerate(totals) if total <= least + TIE * abs(least))


def silhouette(distances: Points, labels: npt.NDArray[np.int64]) -> float:
    """The mean silhouette (Rousseeuw 1987) of a clustering, from the pairwise distances; a
    point alone in its cluster scores 0."""
    return float(silhouettes(distances, labels[None, :])[0])


def silhouettes(distances: Points, labelings: npt.NDArray[np.int64]) -> Points:
    """The mean silhouette of each row of ``labelings`` (runs, points) of the same points, all
    in one product: a round's few points cost Python calls, not arithmetic."""
    runs, count = labelings.shape
    widest = int(np.maximum.reduce(labelings, axis=None)) + 1
    members = _identity(widest)[labelings]  # (runs, points, clusters)
    sizes = np.add.reduce(members, axis=1)[:, None, :]  # (runs, 1, clusters)
    sums = distances @ members  # (runs, points, clusters): each point's total distance to each
    rows, points = _grid(runs, count)
    own_size = sizes[rows, 0, labelings]
    inside = sums[rows, points, labelings] / np.maximum(own_size - 1, 1)
    means = np.where(sizes > 0, sums / np.maximum(sizes, 1), np.inf)
    means[rows, points, labelings] = np.inf
    nearest = np.minimum.reduce(means, axis=2)
    scale = np.maximum(inside, nearest)
    scores = np.divide(nearest - inside, scale, out=np.zeros((runs, count)), where=scale > 0)
    scores[own_size == 1] = 0.0
    means_by_run: Points = np.add.reduce(scores, axis=1) / count
    return means_by_run


@functools.lru_cache(maxsize=16)
def _grid(runs: int, count: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The run and the point index of each entry of a (runs, points) array, broadcast.
    Read only: one per shape, kept."""
    rows, points = np.arange(runs)[:, None], np.arange(count)[None, :]
    rows.flags.writeable = points.flags.writeable = False
    return rows, points


@functools.lru_cache(maxsize=16)
def _identity(size: int) -> Points:
    """The ``size`` x ``size`` identity: its rows indexed by labels are one-hot rows. Read
    only: one per size, kept."""
    identity: Points = np.zeros((size, size))
    identity.flat[:: size + 1] = 1.0
    identity.flags.writeable = False
    return identity


def _by_size(labels: Sequence[int]) -> list[int]:
    """The labels renumbered by cluster size, largest first (ties by first appearance), so
    that a round's cluster 0 is its largest group."""
    sizes: dict[int, int] = {}  # its keys in order of first appearance, which sorted() keeps
    for label in labels:
        sizes[label] = sizes.get(label, 0) + 1
    order = sorted(sizes, key=sizes.__getitem__, reverse=True)
    rank = {label: index for index, label in enumerate(order)}
    return [rank[label] for label in labels]
