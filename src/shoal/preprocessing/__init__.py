"""Federated preprocessing: the seed's two passes.

Pass 1, a statistics run (``[statistics]``): each client sends the moments of its
features (the mean of each feature and of its square, over its records, each clipped
into the job's bounds and scaled into [0, 1]) weighted by its record count; the
coordinator averages them, securely where the job says so, into the population's mean
and variance, and writes them as ``statistics.json``. Pass 2, a training run
(``[preprocessing] statistics``): the coordinator sends the :class:`Scaler` those give
with every task, and each client standardizes its features with it before training or
evaluating (see docs/federated-preprocessing.md).
"""

from shoal.preprocessing.scaler import SCALER_KEY, Scaler, scaler_of
from shoal.preprocessing.statistics import (
    AGGREGATE_TOLERANCE,
    BOUNDS_KEY,
    MAX_FEATURES,
    STATISTICS_FILE,
    FeatureBounds,
    FeatureStatistics,
    MomentsCheck,
    bounds_of,
    local_moments,
    moments_layout,
    read_statistics,
)

__all__ = [
    "AGGREGATE_TOLERANCE",
    "BOUNDS_KEY",
    "MAX_FEATURES",
    "SCALER_KEY",
    "STATISTICS_FILE",
    "FeatureBounds",
    "FeatureStatistics",
    "MomentsCheck",
    "Scaler",
    "bounds_of",
    "local_moments",
    "moments_layout",
    "read_statistics",
    "scaler_of",
]
