"""Shamir sharing: any t shares reconstruct, t - 1 reveal nothing, bad input is refused."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core import ProtocolError
from shoal.secure import shamir
from shoal.secure.shamir import (
    PRIME,
    bytes_to_field,
    field_to_bytes,
    lagrange_at_zero,
    random_field_elements,
    reconstruct,
    share,
)

field_vectors = st.lists(st.integers(0, PRIME - 1), min_size=0, max_size=20).map(
    lambda values: np.array(values, dtype=np.int64)
)


@settings(max_examples=40, deadline=None)
@given(secrets=field_vectors, sizes=st.tuples(st.integers(1, 7), st.integers(0, 5)), data=st.data())
def test_any_threshold_shares_reconstruct(
    secrets: np.ndarray, sizes: tuple[int, int], data: st.DataObject
) -> None:
    threshold, extra = sizes
    num_shares = threshold + extra
    shares = share(secrets, threshold=threshold, num_shares=num_shares)
    assert shares.shape == (num_shares, secrets.size)
    chosen = data.draw(
        st.lists(
            st.integers(0, num_shares - 1), min_size=threshold, max_size=num_shares, unique=True
        )
    )
    xs = [index + 1 for index in chosen]
    np.testing.assert_array_equal(reconstruct(xs, shares[chosen]), secrets)


@settings(max_examples=30, deadline=None)
@given(
    coefficients=st.lists(
        st.lists(st.integers(0, PRIME - 1), min_size=3, max_size=3), min_size=1, max_size=9
    ),
    points=st.lists(st.integers(1, PRIME - 1), min_size=1, max_size=6, unique=True),
)
def test_the_vandermonde_product_is_the_polynomial_exactly(
    coefficients: list[list[int]], points: list[int]
) -> None:
    # the field's largest elements are where an int64 product would overflow first
    matrix = np.array(coefficients, dtype=np.int64)
    expected = [
        [
            sum(int(c) * pow(x, j, PRIME) for j, c in enumerate(column)) % PRIME
            for column in matrix.T
        ]
        for x in points
    ]
    assert shamir._evaluate(matrix, points).tolist() == expected


def test_horner_takes_over_beyond_the_exact_product(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = random_field_elements((5, 4))
    points = [3, PRIME - 1, 17]
    exact = shamir._evaluate(matrix, points)
    monkeypatch.setattr(shamir, "_MAX_TERMS", 2)
    np.testing.assert_array_equal(shamir._evaluate(matrix, points), exact)


def test_lagrange_weights_are_cached_but_never_shared() -> None:
    weights = lagrange_at_zero([1, 2, 3])
    assert weights == [3, PRIME - 3, 1]  # 3 f(1) - 3 f(2) + f(3) = f(0) for a quadratic
    weights[0] = 0
    assert lagrange_at_zero((1, 2, 3)) == [3, PRIME - 3, 1]


@settings(max_examples=60, deadline=None)
@given(xs=st.sets(st.integers(1, PRIME - 1), min_size=1, max_size=40))
def test_lagrange_weights_interpolate_every_polynomial_below_their_count_at_zero(
    xs: set[int],
) -> None:
    # sum_i w_i x_i^k is 1 for k = 0 and 0 for 0 < k < t: the defining property of the weights
    points = sorted(xs)
    weights = lagrange_at_zero(points)
    for k in range(len(points)):
        total = sum(w * pow(x, k, PRIME) for w, x in zip(weights, points, strict=True)) % PRIME
        assert total == (1 if k == 0 else 0)


def test_every_subset_of_threshold_size_reconstructs() -> None:
    secrets = random_field_elements((64,))
    shares = share(secrets, threshold=4, num_shares=7)
    for subset in itertools.combinations(range(7), 4):
        np.testing.assert_array_equal(
            reconstruct([i + 1 for i in subset], shares[list(subset)]), secrets
        )


def test_fewer_than_threshold_shares_do_not_reconstruct() -> None:
    secrets = random_field_elements((256,))
    shares = share(secrets, threshold=4, num_shares=7)
    for subset in itertools.combinations(range(7), 3):
        guess = reconstruct([i + 1 for i in subset], shares[list(subset)])
        assert np.mean(guess == secrets) < 0.01  # chance agreement is 1 / p per value


def test_a_single_share_is_uniform_whatever_the_secret() -> None:
    # the share of party 1 for a fixed secret, over many sharings: uniform on the field,
    # checked by the counts in 16 equal bins (chi-square, 15 degrees of freedom)
    secret = np.zeros(4000, dtype=np.int64)
    first = share(secret, threshold=3, num_shares=5)[0]
    counts = np.bincount((first * 16) // PRIME, minlength=16)
    expected = first.size / 16
    assert ((counts - expected) ** 2 / expected).sum() < 60  # p < 1e-6 beyond about 56: no flakes


def test_random_field_elements_are_in_range_and_vary() -> None:
    values = random_field_elements((10_000,))
    assert values.min() >= 0 and values.max() < PRIME
    assert len(np.unique(values)) > 9_990
    assert random_field_elements((0,)).size == 0


@pytest.mark.parametrize("length", [0, 1, 31, 32, 33])
def test_bytes_travel_as_limbs(length: int) -> None:
    data = os.urandom(length)
    shares = share(bytes_to_field(data), threshold=2, num_shares=3)
    assert field_to_bytes(reconstruct([2, 3], shares[1:]), length=length) == data


def test_a_garbled_share_reconstructs_limbs_that_are_caught_as_bytes() -> None:
    # Shamir itself authenticates nothing (the protocol seals shares with AES-GCM);
    # but a share replaced by garbage almost surely yields limbs outside 16 bits
    data = os.urandom(32)
    shares = share(bytes_to_field(data), threshold=2, num_shares=3)
    shares[0] = random_field_elements((shares.shape[1],))
    with pytest.raises(ProtocolError, match="limbs out of range"):
        field_to_bytes(reconstruct([1, 2], shares[:2]), length=32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: share(np.array([1]), threshold=0, num_shares=3), "threshold"),
        (lambda: share(np.array([1]), threshold=4, num_shares=3), "threshold"),
        (lambda: share(np.array([PRIME]), threshold=1, num_shares=1), "secrets must lie"),
        (lambda: share(np.array([[1]]), threshold=1, num_shares=1), "1-D integer"),
        (lambda: share(np.array([0.5]), threshold=1, num_shares=1), "1-D integer"),
        (lambda: reconstruct([1, 1], np.zeros((2, 3), np.int64)), "distinct"),
        (lambda: reconstruct([0, 1], np.zeros((2, 3), np.int64)), "distinct"),
        (lambda: reconstruct([1, 2], np.zeros((3, 3), np.int64)), "x values"),
        (lambda: reconstruct([1], np.full((1, 3), PRIME, np.int64)), "not an element"),
    ],
)
def test_bad_input_is_refused(call: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        call()  # type: ignore[operator]
