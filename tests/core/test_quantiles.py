"""Quantiles over a sorted list give numpy's very floats, not floats near them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core.quantiles import median_of_sorted, ordered, quantile_of_sorted

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)


@given(st.lists(finite, min_size=1, max_size=40), st.floats(min_value=0.0, max_value=1.0))
def test_quantile_is_numpys_linear_quantile_to_the_bit(values: list[float], q: float) -> None:
    assert quantile_of_sorted(ordered(values), q) == float(np.quantile(np.array(values), q))


@given(st.lists(finite, min_size=1, max_size=40), st.sampled_from([50, 90, 99]))
def test_a_percentile_is_numpys_to_the_bit(values: list[float], percent: int) -> None:
    ascending = sorted(values)
    assert quantile_of_sorted(ascending, percent / 100) == float(np.percentile(values, percent))


@given(st.lists(finite, min_size=1, max_size=40))
def test_median_is_numpys_median_to_the_bit(values: list[float]) -> None:
    assert median_of_sorted(ordered(values)) == float(np.median(np.array(values)))


def test_no_values_have_no_quantile() -> None:
    with pytest.raises(ValueError, match="no values"):
        quantile_of_sorted([], 0.5)
    with pytest.raises(ValueError, match="no values"):
        median_of_sorted([])
