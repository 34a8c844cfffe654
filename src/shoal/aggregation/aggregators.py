"""Aggregators: rules that combine client deltas into one update (mean, median, trimmed mean, Krum).

Every rule has the same small interface, with explicit state::

    state = rule.init(num_parameters=P)
    for delta, weight in arrivals:
        state = rule.accumulate(state, delta, weight=weight)
    aggregate = rule.finalize(state)

A state is consumed by the call that takes it: keep only the returned one.
A rule keeps nothing outside its states: the round engine may fold a round's
updates into a state while its policy decides on them, and throw that state
away (with every update it took) when the policy denies one.
``WeightedMean`` streams in O(P) memory: its running sum is updated in place
and ``finalize`` divides it in place, so reusing a consumed state raises
StrategyError rather than counting an update twice. The robust rules buffer
a copy of each update (O(K P) memory) and do their work in ``finalize``;
they are unweighted by design: a client's claimed example count must not buy it
more influence over a median or a Krum selection, so their ``weight`` is
validated and otherwise ignored.

>>> rule = WeightedMean()
>>> state = rule.init(num_parameters=2)
>>> state = rule.accumulate(state, np.array([1, 2], np.float32), weight=1.0)
>>> state = rule.accumulate(state, np.array([3, 4], np.float32), weight=3.0)
>>> rule.finalize(state)
array([2.5, 3.5], dtype=float32)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt
from scipy.linalg import blas as scipy_blas  # type: ignore[import-untyped]

from shoal.core.errors import StrategyError
from shoal.core.parameters import Vector, all_finite

AggregatorState = Any
Float64Matrix = npt.NDArray[np.float64]
TieBreaker = Callable[[Sequence[int]], int]

_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Scores within this relative distance of the best count as tied (Gram rounding).
_TIE_RELATIVE_TOLERANCE = 1e-9
# Column blocks of about this many values keep the robust rules cache-friendly.
_BLOCK_VALUES = 1 << 20


class Aggregator(Protocol):
    """The interface every aggregation rule implements (see the module docstring)."""

    @property
    def name(self) -> str: ...

    @property
    def streaming(self) -> bool: ...

    def init(self, *, num_parameters: int) -> AggregatorState: ...

    def accumulate(
        self, state: AggregatorState, update: Vector, *, weight: float
    ) -> AggregatorState: ...

    def finalize(self, state: AggregatorState) -> Vector: ...


# --- validation ---------------------------------------------------------------


def check_update(update: object, *, num_parameters: int) -> Vector:
    """Return ``update`` if it is a finite 1-D float32 vector of the right length."""
    vector = check_shape(update, num_parameters=num_parameters)
    if not _all_finite(vector):
        raise StrategyError("an update holds NaN or infinite values")
    return vector


def check_shape(update: object, *, num_parameters: int) -> Vector:
    """Return ``update`` if it is a 1-D float32 vector of the right length."""
    if not isinstance(update, np.ndarray) or update.dtype != np.float32 or update.ndim != 1:
        kind = (
            f"an array of dtype {update.dtype} and shape {update.shape}"
            if isinstance(update, np.ndarray)
            else type(update).__name__
        )
        raise StrategyError(f"an update must be a 1-D float32 vector, got {kind}")
    if update.size != num_parameters:
        raise StrategyError(f"an update has {update.size} values, expected {num_parameters}")
    return update


def _all_finite(update: Vector) -> bool:
    return all_finite(update)


def check_weight(weight: object) -> float:
    """Return ``weight`` as a float if it is a finite, non-negative real number."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise StrategyError(f"a weight must be a real number, got {type(weight).__name__}")
    value = float(weight)
    if not math.isfinite(value) or value < 0 or value > _FLOAT32_MAX:
        raise StrategyError(f"a weight must be finite and non-negative, got {value}")
    return value


def _check_num_parameters(num_parameters: int) -> int:
    if isinstance(num_parameters, bool) or not isinstance(num_parameters, numbers.Integral):
        raise StrategyError(f"num_parameters must be an integer, got {num_parameters!r}")
    if num_parameters < 0:
        raise StrategyError(f"num_parameters must be non-negative, got {num_parameters}")
    return int(num_parameters)


# --- weighted mean (streaming) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeanState:
    """A running weighted sum; ``generation`` is shared by the states of one round."""

    total: Vector
    weight_sum: float
    count: int
    generation: npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class WeightedMean:
    """The weighted mean of the updates (FedAvg's rule), in O(P) memory.

    ``accumulate`` checks the update's shape and weight and adds ``weight *
    update`` into a float32 running sum with one BLAS axpy, with no
    temporaries. It does not read the update a second time to look for NaN
    and inf: updates are checked once where they enter (the coordinator
    rejects them as invalid), and ``finalize`` refuses a sum that is not
    finite, so a bad value that slips through aborts the round rather than
    the model. The relative error stays near 1e-7 over hundreds of
    updates (float64 sums measured 3-7x slower for no useful gain).
    """

    name: ClassVar[str] = "mean"
    streaming: ClassVar[bool] = True

    def init(self, *, num_parameters: int) -> MeanState:
        # np.full touches the pages now, at round start, not during collection.
        total = np.full(_check_num_parameters(num_parameters), 0.0, dtype=np.float32)
        return MeanState(total, 0.0, 0, np.zeros(1, dtype=np.int64))

    def accumulate(self, state: MeanState, update: Vector, *, weight: float) -> MeanState:
        _claim(state)
        check_shape(update, num_parameters=state.total.size)
        value = float(np.float32(check_weight(weight)))
        if state.weight_sum + value > _FLOAT32_MAX:
            raise StrategyError("the total weight exceeds the float32 range")
        total = state.total
        if value > 0 and total.size:
            total = scipy_blas.saxpy(update, total, a=value)
        state.generation[0] += 1
        return MeanState(total, state.weight_sum + value, state.count + 1, state.generation)

    def finalize(self, state: MeanState) -> Vector:
        """The weighted mean, computed in place: the state is consumed."""
        _claim(state)
        if state.count == 0:
            raise StrategyError("cannot aggregate: no updates were accumulated")
        if state.weight_sum <= 0:
            raise StrategyError(f"cannot aggregate: the weights of {state.count} updates sum to 0")
        if not _all_finite(state.total):
            raise StrategyError(
                "cannot aggregate: the weighted sum is not finite (NaN or overflow)"
            )
        state.generation[0] += 1
        # In place: a fresh 4 MB result costs more in page faults than the division.
        return np.divide(state.total, np.float32(state.weight_sum), out=state.total)


def _claim(state: MeanState) -> None:
    if state.generation[0] != state.count:
        raise StrategyError("this aggregation state was already consumed; use the latest one")


# --- buffered rules -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BufferState:
    """The updates collected so far (private copies) and the expected length."""

    updates: tuple[Vector, ...]
    num_parameters: int


class _Buffered:
    """``init`` and ``accumulate`` shared by the rules that need every update at once."""

    __slots__ = ()
    streaming: ClassVar[bool] = False

    def init(self, *, num_parameters: int) -> BufferState:
        return BufferState((), _check_num_parameters(num_parameters))

    def accumulate(self, state: BufferState, update: Vector, *, weight: float) -> BufferState:
        check_update(update, num_parameters=state.num_parameters)
        check_weight(weight)
        return BufferState((*state.updates, update.copy()), state.num_parameters)


def _collected(state: BufferState) -> tuple[Vector, ...]:
    if not state.updates:
        raise StrategyError("cannot aggregate: no updates were accumulated")
    return state.updates


def _column_blocks(updates: Sequence[Vector]) -> Iterator[tuple[slice, npt.NDArray[np.float32]]]:
    """Slices of the parameter axis with their (columns, K) blocks of update values."""
    size = updates[0].size
    step = max(1024, _BLOCK_VALUES // len(updates))
    for start in range(0, size, step):
        columns = slice(start, min(start + step, size))
        yield columns, np.stack([update[columns] for update in updates], axis=1)


def coordinate_median(updates: Sequence[Vector]) -> Vector:
    """The coordinate-wise median (the mean of the two middle values for even K), as
    :func:`numpy.median` gives it, bit for bit.

    Each block's K values per coordinate are sorted in place: numpy's sort (vectorized)
    takes a third to a seventh of the time of the partition around the middle that
    ``numpy.median`` runs (100 updates of 100,000 values: 16.6 against 114.8 ms)."""
    count = len(updates)
    middle = count // 2
    result = np.empty(updates[0].size, dtype=np.float32)
    for columns, block in _column_blocks(updates):
        block.sort(axis=1)
        if count % 2:
            result[columns] = block[:, middle]
        else:  # float32, as numpy.median's mean of the two
            result[columns] = (block[:, middle - 1] + block[:, middle]) / np.float32(2)
    return result


def trimmed_per_side(count: int, *, trim_ratio: float) -> int:
    """How many of ``count`` values :func:`trimmed_mean` drops from each side."""
    return math.floor(trim_ratio * count)


def trimmed_mean(updates: Sequence[Vector], *, trim_ratio: float) -> Vector:
    """The coordinate-wise mean after dropping the ``floor(trim_ratio * K)`` extremes each side
    (each block sorted in place, as :func:`coordinate_median`; the kept values summed in
    float64, in order)."""
    cut = trimmed_per_side(len(updates), trim_ratio=trim_ratio)
    result = np.empty(updates[0].size, dtype=np.float32)
    for columns, block in _column_blocks(updates):
        if cut:
            block.sort(axis=1)
            block = block[:, cut:-cut]
        result[columns] = block.mean(axis=1, dtype=np.float64)
    return result


def mean_of(updates: Sequence[Vector], indices: Sequence[int]) -> Vector:
    """The unweighted mean of the chosen updates, summed in float64."""
    total = np.zeros(updates[0].size, dtype=np.float64)
    for index in indices:
        np.add(total, updates[index], out=total)
    return (total / len(indices)).astype(np.float32)


@dataclass(frozen=True, slots=True)
class CoordinateMedian(_Buffered):
    """The coordinate-wise median: bounded by the honest values while f < K/2."""

    name: ClassVar[str] = "median"
    fewest_updates: ClassVar[int] = 3
    """The fewest updates whose median one attacker cannot move at will (of 2: their mean)."""

    def finalize(self, state: BufferState) -> Vector:
        return coordinate_median(_collected(state))


@dataclass(frozen=True, slots=True, kw_only=True)
class TrimmedMean(_Buffered):
    """The coordinate-wise mean without the ``trim_ratio`` largest and smallest values.

    With f attackers and ``f <= trim_ratio * K`` every coordinate of the
    result stays within the range of the honest values.
    """

    trim_ratio: float = 0.1
    name: ClassVar[str] = "trimmed_mean"

    def __post_init__(self) -> None:
        if not (isinstance(self.trim_ratio, numbers.Real) and 0 <= self.trim_ratio < 0.5):
            raise StrategyError(f"trim_ratio must lie in [0, 0.5), got {self.trim_ratio!r}")

    @property
    def fewest_updates(self) -> int:
        """The fewest updates it trims one from each side of (1 at ``trim_ratio=0``, a mean);
        below it, it is a plain mean."""
        if self.trim_ratio == 0:
            return 1
        count = math.ceil(1 / self.trim_ratio)
        while trimmed_per_side(count, trim_ratio=self.trim_ratio) < 1:  # 1 / ratio rounded down
            count += 1
        return count

    def finalize(self, state: BufferState) -> Vector:
        return trimmed_mean(_collected(state), trim_ratio=self.trim_ratio)


# --- Krum and Multi-Krum ------------------------------------------------------


def pairwise_squared_distances(updates: Sequence[Vector]) -> Float64Matrix:
    """All squared L2 distances, in float64, by the Gram-matrix identity.

    Each column block is centred first (distances do not change), which keeps
    the cancellation in ``|a|^2 + |b|^2 - 2 a.b`` small for clustered updates.
    """
    count = len(updates)
    gram = np.zeros((count, count), dtype=np.float64)
    for _, block in _column_blocks(updates):
        centred = block.astype(np.float64)
        centred -= centred.mean(axis=1, keepdims=True)
        gram += centred.T @ centred
    norms = np.diag(gram)
    distances = norms[:, None] + norms[None, :] - 2.0 * gram
    distances = np.maximum((distances + distances.T) / 2.0, 0.0)
    np.fill_diagonal(distances, 0.0)
    return distances


def krum_scores(squared_distances: Float64Matrix, *, num_byzantine: int) -> Float64Matrix:
    """Each update's sum of squared distances to its ``n - f - 2`` nearest neighbours."""
    count = squared_distances.shape[0]
    neighbours = count - num_byzantine - 2
    if neighbours < 1:
        raise StrategyError(
            f"Krum needs n - f - 2 >= 1 neighbours, got n={count}, f={num_byzantine}"
        )
    others = squared_distances.copy()
    np.fill_diagonal(others, np.inf)
    nearest = np.partition(others, neighbours - 1, axis=1)[:, :neighbours]
    # Summing in sorted order makes a score independent of the update order.
    scores: Float64Matrix = np.sort(nearest, axis=1).sum(axis=1)
    return scores


def krum_fewest_updates(*, num_byzantine: int, num_selected: int) -> int:
    """The fewest updates n with 2f + 2 < n - m: 2f + m + 3."""
    return 2 * num_byzantine + num_selected + 3


def check_krum_condition(*, num_updates: int, num_byzantine: int, num_selected: int) -> None:
    """Raise unless 2f + 2 < n - m, the condition under which (Multi-)Krum is run."""
    n, f, m = num_updates, num_byzantine, num_selected
    fewest = krum_fewest_updates(num_byzantine=f, num_selected=m)
    if n < fewest:
        raise StrategyError(
            f"Krum needs 2f + 2 < n - m, but f={f}, m={m}, n={n} gives {2 * f + 2} >= {n - m}: "
            f"collect at least {fewest} updates, or lower f or m"
        )


def multi_krum_select(
    squared_distances: Float64Matrix,
    *,
    num_byzantine: int,
    num_selected: int,
    tie_breaker: TieBreaker = min,
) -> tuple[int, ...]:
    """The indices Multi-Krum selects, in order (Blanchard et al. 2017).

    Repeatedly take the remaining update with the lowest Krum score, its
    neighbours counted among the r updates still remaining (r - f - 2 of
    them), remove it and rescore. ``tie_breaker`` picks among indices whose
    scores tie; the aggregators pass one that compares contents, so the choice
    does not depend on the order in which updates arrived.
    """
    count = squared_distances.shape[0]
    check_krum_condition(num_updates=count, num_byzantine=num_byzantine, num_selected=num_selected)
    remaining = list(range(count))
    chosen: list[int] = []
    while len(chosen) < num_selected:
        subset = squared_distances[np.ix_(remaining, remaining)]
        scores = krum_scores(subset, num_byzantine=num_byzantine)
        best = scores.min()
        tied = np.flatnonzero(scores <= best + _TIE_RELATIVE_TOLERANCE * abs(best))
        index = tie_breaker([remaining[position] for position in tied])
        chosen.append(index)
        remaining.remove(index)
    return tuple(chosen)


def _smallest_lexicographically(updates: Sequence[Vector]) -> TieBreaker:
    def pick(indices: Sequence[int]) -> int:
        best = indices[0]
        for index in indices[1:]:
            differ = np.flatnonzero(updates[index] != updates[best])
            if differ.size and updates[index][differ[0]] < updates[best][differ[0]]:
                best = index
        return best

    return pick


@dataclass(frozen=True, slots=True, kw_only=True)
class Krum(_Buffered):
    """Krum (``num_selected=1``) and Multi-Krum (``num_selected=m > 1``).

    The aggregate is the mean of the m selected updates (see
    :func:`multi_krum_select`). ``finalize`` requires 2f + 2 < n - m for the
    n updates it holds. ``num_selected=None`` selects the most the condition
    allows, m = n - 2f - 3 (close to the paper's m = n - f for large cohorts).
    """

    num_byzantine: int = 1
    num_selected: int | None = 1

    def __post_init__(self) -> None:
        if not _is_count(self.num_byzantine, minimum=0):
            raise StrategyError(
                f"num_byzantine must be an integer >= 0, got {self.num_byzantine!r}"
            )
        if self.num_selected is not None and not _is_count(self.num_selected, minimum=1):
            raise StrategyError(f"num_selected must be an integer >= 1, got {self.num_selected!r}")

    @property
    def name(self) -> str:
        return "krum" if self.num_selected == 1 else "multikrum"

    @property
    def fewest_updates(self) -> int:
        """The fewest updates :meth:`finalize` aggregates (``num_selected=None`` selects one
        at the least)."""
        selected = 1 if self.num_selected is None else self.num_selected
        return krum_fewest_updates(num_byzantine=self.num_byzantine, num_selected=selected)

    def selection(self, state: BufferState) -> tuple[int, ...]:
        """The indices, in arrival order numbering, of the updates Krum selects."""
        updates = _collected(state)
        count = len(updates)
        selected = self.num_selected
        if selected is None:
            selected = max(1, count - 2 * self.num_byzantine - 3)
        check_krum_condition(
            num_updates=count, num_byzantine=self.num_byzantine, num_selected=selected
        )
        return multi_krum_select(
            pairwise_squared_distances(updates),
            num_byzantine=self.num_byzantine,
            num_selected=selected,
            tie_breaker=_smallest_lexicographically(updates),
        )

    def finalize(self, state: BufferState) -> Vector:
        return mean_of(state.updates, self.selection(state))


def _is_count(value: object, *, minimum: int) -> bool:
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and int(value) >= minimum
    )
