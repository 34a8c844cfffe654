"""Quantiles of a round's few values, as numpy computes them, over a sorted list.

A round's telemetry summarizes a handful of values at a time (ten clients'
round trips, their distances to the aggregate): numpy's ``quantile`` and
``median`` cost tens of microseconds of calls around a few comparisons, where
Python's ``sorted`` and a little arithmetic cost a few. The functions here
do numpy's arithmetic in numpy's order, so that they give the very same
floats: :func:`quantile_of_sorted` is ``numpy.quantile`` with its default
``linear`` method (``numpy.percentile`` of ``100 * q``), and
:func:`median_of_sorted` is ``numpy.median``. The values must be finite
(NaN has no place in a sorted list).

>>> ascending = ordered([4.0, 1.0, 2.0, 3.0])
>>> quantile_of_sorted(ascending, 0.9), median_of_sorted(ascending)
(3.7, 2.5)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def ordered(values: Iterable[float]) -> list[float]:
    """``values`` as Python floats, smallest first."""
    return sorted(float(value) for value in values)


def quantile_of_sorted(ascending: Sequence[float], q: float) -> float:
    """The ``q`` quantile of the already sorted ``ascending``: numpy's virtual index
    ``(n - 1) * q``, its floor and fraction, and its interpolation, which runs from the upper
    neighbour down when the fraction is at least one half."""
    if not ascending:
        raise ValueError("a quantile of no values")
    top = len(ascending) - 1
    virtual = top * q
    if virtual >= top:
        return float(ascending[top])
    below = math.floor(virtual)
    fraction = virtual - below
    low, high = ascending[below], ascending[below + 1]
    step = high - low
    if fraction >= 0.5:
        return float(high - step * (1 - fraction))
    return float(low + step * fraction)


def median_of_sorted(ascending: Sequence[float]) -> float:
    """The median of the already sorted ``ascending``: the middle value, or the mean of the
    two middle ones (their sum over two, as numpy takes it)."""
    count = len(ascending)
    if count == 0:
        raise ValueError("a median of no values")
    middle = count // 2
    if count % 2:
        return float(ascending[middle])
    return float((ascending[middle - 1] + ascending[middle]) / 2)
