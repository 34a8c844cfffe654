"""Shamir t-of-n secret sharing over the prime field GF(2^31 - 1), vectorized over many secrets.

Secure aggregation shares thousands of values at once (each client's mask
seed and key, split into field elements), so every function works on a
vector of secrets: ``share`` evaluates one random polynomial per secret at
x = 1..n, and ``reconstruct`` interpolates them at x = 0 from any t shares.
With p = 2^31 - 1 every product of two field elements fits in an int64, so
numpy does the arithmetic without big integers: sharing is one product with
the Vandermonde matrix of the points, and reconstruction one weighted sum,
its Lagrange weights computed once per set of holders. Polynomial
coefficients come from the operating system's CSPRNG: fewer than t shares
reveal nothing.

>>> secrets = np.array([7, 42], dtype=np.int64)
>>> shares = share(secrets, threshold=2, num_shares=3)
>>> reconstruct([1, 3], shares[[0, 2]]).tolist()
[7, 42]
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ProtocolError

PRIME = 2**31 - 1
LIMB_BITS = 16  # a byte string travels as 16-bit limbs, each well inside the field

FieldArray = npt.NDArray[np.int64]


def random_field_elements(shape: tuple[int, ...]) -> FieldArray:
    """Uniform elements of GF(PRIME) from the OS CSPRNG (rejection sampling, no bias)."""
    count = int(np.prod(shape, dtype=np.int64))
    drawn: list[npt.NDArray[np.uint32]] = []
    needed = count
    while needed > 0:
        candidates = np.frombuffer(os.urandom(4 * (needed + 16)), dtype=np.uint32)
        accepted = candidates[candidates < 2 * PRIME]  # 2p is the largest multiple of p below 2^32
        drawn.append(accepted[:needed])
        needed -= len(drawn[-1])
    values = np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.uint32)
    return (values.astype(np.int64) % PRIME).reshape(shape)


def share(
    secrets: npt.ArrayLike,
    *,
    threshold: int,
    num_shares: int | None = None,
    xs: Sequence[int] | None = None,
) -> FieldArray:
    """Split each secret into shares, any ``threshold`` of which recover it.

    The shares are for the parties at ``xs`` (distinct, in [1, PRIME)), or at
    x = 1..num_shares. Returns an array of shape (number of parties,
    len(secrets)); row i is the share for the party at ``xs[i]``.
    """
    values = _as_field(secrets)
    points = _share_points(num_shares, xs)
    if not 1 <= threshold <= len(points):
        raise ProtocolError(f"need 1 <= threshold <= shares, got {threshold} of {len(points)}")
    coefficients = random_field_elements((threshold - 1, values.size))
    return _evaluate(np.vstack([values, coefficients]), points)


def _evaluate(coefficients: FieldArray, points: Sequence[int]) -> FieldArray:
    """Each column of ``coefficients`` (lowest degree first) as a polynomial, at every point.

    One product with the Vandermonde matrix of the points, exact in int64:
    the coefficients split into 16-bit halves, so each product has at most
    47 bits and a sum of up to 2^16 of them cannot overflow.
    """
    degree_count = coefficients.shape[0]
    if degree_count > _MAX_TERMS:  # more terms than an exact int64 product allows: Horner
        xs_column = np.asarray(points, dtype=np.int64)[:, None]
        result = np.zeros((len(points), coefficients.shape[1]), dtype=np.int64)
        for coefficient in coefficients[::-1]:
            result = (result * xs_column + coefficient) % PRIME
        return result
    powers = _vandermonde(points, degree_count)
    high: FieldArray = powers @ (coefficients >> LIMB_BITS) % PRIME
    low: FieldArray = powers @ (coefficients & _LOW_MASK) % PRIME
    values: FieldArray = ((high << LIMB_BITS) + low) % PRIME
    return values


_MAX_TERMS = 2**16
_LOW_MASK = (1 << LIMB_BITS) - 1


def _vandermonde(points: Sequence[int], degree_count: int) -> FieldArray:
    """The matrix of x^j mod PRIME, a row per point, j = 0 .. degree_count - 1."""
    powers = np.ones((len(points), degree_count), dtype=np.int64)
    xs = np.asarray(points, dtype=np.int64)
    for j in range(1, degree_count):
        powers[:, j] = powers[:, j - 1] * xs % PRIME
    return powers


def _share_points(num_shares: int | None, xs: Sequence[int] | None) -> list[int]:
    if (num_shares is None) == (xs is None):
        raise ProtocolError("give either num_shares or xs")
    if xs is None:
        assert num_shares is not None
        if not 1 <= num_shares < PRIME:
            raise ProtocolError(f"need 1 <= num_shares < {PRIME}, got {num_shares}")
        return list(range(1, num_shares + 1))
    points = [int(x) for x in xs]
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ProtocolError(f"share x values must be distinct and in [1, {PRIME}), got {points}")
    return points


def reconstruct(xs: Sequence[int], shares: npt.ArrayLike) -> FieldArray:
    """The secrets, interpolated at x = 0 from the shares of the parties at ``xs``.

    Exactly as many shares as the threshold are needed (more also work);
    fewer give an unrelated value, which is the point of the scheme.
    """
    rows = np.asarray(shares, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[0] != len(xs):
        raise ProtocolError(f"{len(xs)} x values for shares of shape {rows.shape}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ProtocolError(f"share x values must be distinct and in [1, {PRIME}), got {list(xs)}")
    if np.any((rows < 0) | (rows >= PRIME)):
        raise ProtocolError("a share is not an element of the field")
    weights = np.asarray(_lagrange_at_zero(tuple(xs)), dtype=np.int64)[:, None]
    # each product fits in int64 (two field elements), and so does a sum of fewer than
    # 2^32 reduced ones
    secrets: FieldArray = np.sum(rows * weights % PRIME, axis=0) % PRIME
    return secrets


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """The Lagrange weights that interpolate the points ``xs`` at x = 0, mod PRIME."""
    return list(_lagrange_at_zero(tuple(xs)))


@functools.lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    # a server rebuilds many secrets from the same holders: the weights are computed once
    # w_i = prod_{j != i} x_j / (x_j - x_i) = (prod_j x_j) / (x_i prod_{j != i} (x_j - x_i)):
    # one product of all points, and all the divisors inverted with one exponentiation
    product = 1
    for x in xs:
        product = product * x % PRIME
    divisors = []
    for i, xi in enumerate(xs):
        divisor = xi
        for j, xj in enumerate(xs):
            if i != j:
                divisor = divisor * (xj - xi) % PRIME
        divisors.append(divisor)
    return tuple(product * inverse % PRIME for inverse in _inverses(divisors))


def _inverses(values: list[int]) -> list[int]:
    """The inverses mod PRIME of nonzero ``values``, with one exponentiation (Montgomery's
    trick: invert the product of all, then peel one factor off at a time)."""
    prefixes = [1]
    for value in values:
        prefixes.append(prefixes[-1] * value % PRIME)
    inverse = pow(prefixes[-1], PRIME - 2, PRIME)
    inverses = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        inverses[i] = inverse * prefixes[i] % PRIME
        inverse = inverse * values[i] % PRIME
    return inverses


def bytes_to_field(data: bytes) -> FieldArray:
    """A byte string as 16-bit limbs (each a field element); an odd length is padded."""
    padded = data + b"\0" * (len(data) % 2)
    return np.frombuffer(padded, dtype=">u2").astype(np.int64)


def field_to_bytes(limbs: npt.ArrayLike, *, length: int) -> bytes:
    """The inverse of :func:`bytes_to_field` for a string of ``length`` bytes."""
    values = np.asarray(limbs, dtype=np.int64)
    if np.any((values < 0) | (values >= 2**LIMB_BITS)):
        raise ProtocolError("limbs out of range: the shares did not reconstruct these bytes")
    return values.astype(">u2").tobytes()[:length]


def _as_field(secrets: npt.ArrayLike) -> FieldArray:
    values = np.asarray(secrets)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ProtocolError(
            f"secrets must be a 1-D integer array, got {values.dtype} {values.shape}"
        )
    if np.any((values < 0) | (values >= PRIME)):
        raise ProtocolError(f"secrets must lie in [0, {PRIME})")
    return values.astype(np.int64)
