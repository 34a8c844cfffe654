"""Exposure of a planted canary (Carlini et al. 2019): ranks, bounds, ties, extrapolation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core.errors import DataError
from shoal.privacy.exposure import (
    EXPOSURE_CEILING,
    canary_rank,
    exposure,
    exposures,
    extrapolated_exposures,
    record_losses,
)

finite_losses = st.floats(min_value=0.0, max_value=50.0, allow_nan=False)
references = st.lists(finite_losses, min_size=0, max_size=60)


def test_the_best_canary_has_log2_of_the_candidates_and_the_worst_has_zero() -> None:
    reference = np.arange(1.0, 1024.0)  # 1023 references: 1024 candidates with the canary
    assert exposure(0.0, reference) == 10.0
    assert exposure(5000.0, reference) == 0.0
    assert canary_rank(0.0, reference) == 1.0
    assert canary_rank(5000.0, reference) == 1024.0


def test_no_references_is_no_evidence() -> None:
    assert exposure(0.3, []) == 0.0
    assert exposures([], [1.0, 2.0]).size == 0


def test_ties_count_half_so_an_indistinguishable_canary_is_a_random_candidate() -> None:
    assert canary_rank(1.0, [1.0, 1.0, 1.0, 1.0]) == 3.0  # mid-rank of 5 equal candidates
    assert exposure(1.0, [1.0] * 7) == pytest.approx(math.log2(8) - math.log2(4.5))
    assert canary_rank(2.0, [1.0, 2.0, 3.0]) == 2.5


@given(st.lists(finite_losses, min_size=1, max_size=40), references)
def test_exposure_lies_between_zero_and_log2_of_the_candidates(
    canaries: list[float], reference: list[float]
) -> None:
    bits = exposures(canaries, reference)
    assert np.all(bits >= 0.0)
    assert np.all(bits <= math.log2(len(reference) + 1) + 1e-12)
    assert bits == pytest.approx([exposure(loss, reference) for loss in canaries])


@given(finite_losses, finite_losses, references)
def test_a_lower_loss_never_lowers_the_exposure(a: float, b: float, reference: list) -> None:
    low, high = min(a, b), max(a, b)
    assert canary_rank(low, reference) <= canary_rank(high, reference)
    assert exposure(low, reference) >= exposure(high, reference)


@given(references, st.integers(min_value=0, max_value=60))
def test_exposure_is_log2_candidates_over_rank(reference: list[float], position: int) -> None:
    assert canary_rank(-1.0, reference) == 1.0  # below every reference
    ordered = sorted(set(reference))
    if ordered:
        loss = ordered[min(position, len(ordered) - 1)]
        rank = canary_rank(loss, reference)
        lower = sum(1 for value in reference if value < loss)
        assert rank == 1 + lower + reference.count(loss) / 2
        expected = math.log2(len(reference) + 1) - math.log2(rank)
        assert exposure(loss, reference) == pytest.approx(expected)


def test_record_losses_are_the_log_perplexity_of_the_label() -> None:
    shares = np.array([[0.9, 0.1], [0.2, 0.8], [1.0, 0.0]])
    losses = record_losses(shares, [0, 0, 1])
    assert losses[:2] == pytest.approx([-math.log(0.9), -math.log(0.2)])
    assert np.isfinite(losses[2]) and losses[2] > 700  # an underflowed probability stays finite
    assert record_losses(np.zeros((0, 3)), np.zeros(0, np.int64)).size == 0


@pytest.mark.parametrize(
    ("shares", "labels"),
    [(np.ones((2, 3)) / 3, [0]), (np.ones((2, 3)) / 3, [0, 3]), (np.ones(3) / 3, [0])],
)
def test_record_losses_refuse_mismatched_inputs(shares: np.ndarray, labels: list) -> None:
    with pytest.raises(DataError):
        record_losses(shares, labels)


def test_nan_losses_are_refused() -> None:
    with pytest.raises(DataError, match="NaN"):
        exposure(math.nan, [1.0])
    with pytest.raises(DataError, match="NaN"):
        exposures([1.0], [math.nan])


@pytest.mark.parametrize("distribution", ["skewnorm", "normal"])
def test_extrapolation_agrees_with_the_rank_inside_the_references(distribution: str) -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(5.0, 1.0, size=4000)
    # a canary at the 1/64 quantile: 6 bits by rank and by the fitted distribution
    canary = float(np.quantile(reference, 1 / 64))
    by_rank = exposure(canary, reference)
    (fitted,) = extrapolated_exposures([canary], reference, distribution=distribution)
    assert by_rank == pytest.approx(6.0, abs=0.3)
    assert fitted == pytest.approx(by_rank, abs=0.5)


@pytest.mark.parametrize("distribution", ["skewnorm", "normal"])
def test_extrapolation_goes_beyond_what_the_rank_can_show(distribution: str) -> None:
    reference = np.random.default_rng(4).normal(5.0, 1.0, size=255)  # at most 8 bits by rank
    bits = extrapolated_exposures([5.0 - 7.0, 5.0 - 3.0, 5.0], reference, distribution=distribution)
    assert exposure(5.0 - 7.0, reference) == 8.0
    assert bits[0] > 20.0  # seven standard deviations: about 38 bits for a normal
    assert bits[0] > bits[1] > bits[2] >= 0.0
    assert bits[2] == pytest.approx(1.0, abs=0.4)  # the median candidate: one bit


def test_extrapolation_saturates_and_needs_a_spread_of_references() -> None:
    reference = np.random.default_rng(5).normal(5.0, 0.01, size=200)
    (far,) = extrapolated_exposures([-1e6], reference, distribution="normal")
    assert far == EXPOSURE_CEILING
    flat = extrapolated_exposures([0.5, 2.0], [1.0] * 9)
    assert flat == pytest.approx(exposures([0.5, 2.0], [1.0] * 9))
    with pytest.raises(DataError, match="at least 3"):
        extrapolated_exposures([0.5], [1.0, 2.0])
    with pytest.raises(DataError, match="distribution"):
        extrapolated_exposures([0.5], [1.0, 2.0, 3.0], distribution="cauchy")  # type: ignore[arg-type]
