"""The exposure of a planted secret in a trained model (Carlini et al. 2019, "The Secret Sharer").

A canary is a random record planted in the training data; the references
are records drawn from the same randomness space but never planted. The
model scores each record by its loss, here the log-perplexity of a labelled
record, ``-log p(label | features)``. The candidate set ``R`` is the
references plus the canary itself (``|R| = references + 1``), and the
canary's rank is its position in ``R`` sorted by loss, lowest first::

    rank     = 1 + #(references with a lower loss) + #(references with an equal loss) / 2
    exposure = log2(|R|) - log2(rank)

A tie counts half (the mid-rank), so a model that cannot tell the canary
from a reference at all gives it the expected rank of a random candidate.
Exposure lies in ``[0, log2 |R|]``: 0 when the canary is the least likely
candidate, ``log2 |R|`` when it is the most likely one, about 1.44 (log2 e)
on average for a record the model never saw. Read it as "the model makes
the secret 2**exposure times more likely than a random candidate, among
|R|": near ``log2 |R|`` it is memorized; near 1, indistinguishable.

The rank cannot measure more than ``log2 |R|`` bits. The extrapolated
exposure fits a distribution to the references' losses (the paper's
skew-normal, or a normal approximation) and reads the canary's share of
that distribution: ``-log2 P(loss <= canary's loss)``, which may exceed
``log2 |R|``; it saturates at :data:`EXPOSURE_CEILING` bits, where the
share underflows float64.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import numpy.typing as npt

from shoal.core.errors import DataError

FloatArray = npt.NDArray[np.float64]
Distribution = Literal["skewnorm", "normal"]

EXPOSURE_CEILING = 1074.0
"""The most bits an extrapolated exposure reports: float64's smallest positive value is 2**-1074."""
MIN_FITTED_REFERENCES = 3
"""A distribution is fitted to no fewer references (a skew-normal has three parameters)."""


def record_losses(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> FloatArray:
    """Each labelled record's log-perplexity, ``-log p(label | features)``, in nats.

    ``probabilities`` has shape (rows, classes); a probability that underflowed
    to 0 counts as float64's smallest normal value, so every loss is finite.

    >>> record_losses([[0.5, 0.5], [0.25, 0.75]], [0, 1]).round(4).tolist()
    [0.6931, 0.2877]
    """
    shares = np.asarray(probabilities, dtype=np.float64)
    picks = np.asarray(labels, dtype=np.int64)
    if shares.ndim != 2 or picks.shape != (shares.shape[0],):
        raise DataError(
            f"need probabilities (rows, classes) and one label a row, got shapes "
            f"{shares.shape} and {picks.shape}"
        )
    if picks.size and (picks.min() < 0 or picks.max() >= shares.shape[1]):
        raise DataError(f"labels must lie in [0, {shares.shape[1]})")
    chosen = shares[np.arange(picks.size), picks]
    losses: FloatArray = -np.log(np.maximum(chosen, np.finfo(np.float64).tiny))
    return losses


def canary_rank(canary_loss: float, reference_losses: npt.ArrayLike) -> float:
    """The canary's rank among the candidates, 1 (lowest loss) to ``references + 1``.

    References with an equal loss count half each (see the module docstring).
    """
    references = _losses(reference_losses, what="reference losses")
    loss = _loss(canary_loss)
    lower = int(np.count_nonzero(references < loss))
    equal = int(np.count_nonzero(references == loss))
    return 1.0 + lower + equal / 2


def exposure(canary_loss: float, reference_losses: npt.ArrayLike) -> float:
    """The canary's exposure in bits: ``log2(references + 1) - log2(rank)``.

    >>> exposure(0.1, [1.0, 2.0, 3.0])  # the most likely of 4 candidates
    2.0
    >>> exposure(9.0, [1.0, 2.0, 3.0])  # the least likely
    0.0
    """
    references = _losses(reference_losses, what="reference losses")
    rank = canary_rank(canary_loss, references)
    return math.log2(references.size + 1) - math.log2(rank)


def exposures(canary_losses: npt.ArrayLike, reference_losses: npt.ArrayLike) -> FloatArray:
    """:func:`exposure` of each canary against the same references (sorted once)."""
    canaries = _losses(canary_losses, what="canary losses")
    references = np.sort(_losses(reference_losses, what="reference losses"))
    lower = np.searchsorted(references, canaries, side="left")
    equal = np.searchsorted(references, canaries, side="right") - lower
    ranks = 1.0 + lower + equal / 2
    bits: FloatArray = np.log2(references.size + 1) - np.log2(ranks)
    return bits


def extrapolated_exposures(
    canary_losses: npt.ArrayLike,
    reference_losses: npt.ArrayLike,
    *,
    distribution: Distribution = "skewnorm",
) -> FloatArray:
    """Each canary's exposure read from a distribution fitted to the references' losses.

    ``-log2 F(loss)``, with ``F`` the fitted cumulative distribution: the
    bits of how unlikely a reference is to score as well as the canary,
    beyond the ``log2 |R|`` that the rank can show. References without any
    spread give no distribution: the rank's exposure is returned instead.
    """
    canaries = _losses(canary_losses, what="canary losses")
    references = _losses(reference_losses, what="reference losses")
    if references.size < MIN_FITTED_REFERENCES:
        raise DataError(
            f"fitting a distribution needs at least {MIN_FITTED_REFERENCES} references, "
            f"got {references.size}"
        )
    if np.ptp(references) == 0:
        return exposures(canaries, references)
    log_shares = _fitted_log_cdf(canaries, references, distribution)
    bits: FloatArray = np.clip(-log_shares / math.log(2), 0.0, EXPOSURE_CEILING)
    return bits


def _fitted_log_cdf(canaries: FloatArray, references: FloatArray, distribution: str) -> FloatArray:
    # scipy.stats takes a third of a second to import: only a run with canaries pays it
    from scipy import stats  # type: ignore[import-untyped]

    if distribution == "normal":
        log_cdf: FloatArray = stats.norm.logcdf(
            canaries, loc=references.mean(), scale=references.std()
        )
        return log_cdf
    if distribution != "skewnorm":
        raise DataError(f"distribution must be 'skewnorm' or 'normal', got {distribution!r}")
    shape, loc, scale = stats.skewnorm.fit(references)
    skewed: FloatArray = stats.skewnorm.logcdf(canaries, shape, loc=loc, scale=scale)
    return skewed


def _losses(values: npt.ArrayLike, *, what: str) -> FloatArray:
    losses = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(losses).any():
        raise DataError(f"{what} must not be NaN")
    return losses


def _loss(value: float) -> float:
    loss = float(value)
    if math.isnan(loss):
        raise DataError("a canary's loss must not be NaN")
    return loss
