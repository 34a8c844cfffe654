"""Pass 1 of federated preprocessing: the population's feature statistics from clients' moments.

A statistics run's "model" is two vectors of one value a feature (:func:`moments_layout`):
the mean of ``u`` and of ``u**2``, where ``u = (clip(x, low, high) - low) / (high - low)``
is each record's feature clipped into the job's bounds and scaled into [0, 1]. A client's
result is its own moments (:func:`local_moments`), weighted by its record count, so the
coordinator's weighted mean of them, in the clear or under secure aggregation, is the
moments of every record the cohort holds; :meth:`FeatureStatistics.from_moments` turns those
into each feature's mean and variance. The bounds keep every value a client sends in [0, 1]
(what secure aggregation's fixed point needs), and let the coordinator refuse a plaintext
result no records could give (:class:`MomentsCheck`).

>>> bounds = FeatureBounds.of(0.0, 10.0, features=2)
>>> moments, count = local_moments([[0.0, 10.0], [10.0, 10.0]], bounds)
>>> count, moments.tolist()
(2, [0.5, 1.0, 0.5, 1.0])
>>> statistics = FeatureStatistics.from_moments(moments, bounds, examples=count)
>>> statistics.mean.tolist(), statistics.std.tolist()
([5.0, 10.0], [5.0, 0.0])
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ConfigError, DataError
from shoal.core.parameters import Layout, TensorSpec
from shoal.preprocessing._json import cached, floats, from_extras, loads, object_of
from shoal.preprocessing.scaler import MAX_SCALER_FEATURES, MAX_SCALER_TEXT, Scaler

MAX_FEATURES = MAX_SCALER_FEATURES
STATISTICS_FILE = "statistics.json"
BOUNDS_KEY = "shoal_statistics_bounds"
"""The task extras key a statistics run's feature bounds travel under: each client clips and
scales with the coordinator's bounds, never with those of its own copy of the job."""
FORMAT = "shoal-feature-statistics/1"
_MAX_FILE_BYTES = 64 * 2**20
_TOLERANCE = 1e-6  # float32 rounding of a client's moments, well inside it
AGGREGATE_TOLERANCE = 1e-4
"""How far the cohort's averaged moments may stray outside what records give before the run
refuses them (a secure sum's rounding stays within about 1e-7; a client that sent moments
outside [0, 1] under secure aggregation, where no one checks one client's, moves them more)."""
RESOLUTION = 1e-6
"""The smallest variance, as a share of the squared range, that float32 moments resolve to
within a few percent: a feature whose variance is below it is named ``unresolved``."""

Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True, eq=False)
class FeatureBounds:
    """Each feature's ``low`` and ``high``: a record's value is clipped into them."""

    low: Array
    high: Array

    def __init__(self, low: npt.ArrayLike, high: npt.ArrayLike) -> None:
        lows = np.array(low, dtype=np.float64)
        highs = np.array(high, dtype=np.float64)
        if lows.ndim != 1 or lows.shape != highs.shape or not 1 <= lows.size <= MAX_FEATURES:
            raise ConfigError(
                f"bounds are one low and one high a feature (1 to {MAX_FEATURES:,} features), "
                f"got {lows.size} lows and {highs.size} highs"
            )
        with np.errstate(over="ignore"):  # a width past a float's range is refused below
            width = highs - lows
        wrong = ~(np.isfinite(lows) & np.isfinite(highs) & np.isfinite(width) & (width > 0))
        if wrong.any():
            index = int(np.flatnonzero(wrong)[0])
            raise ConfigError(
                f"feature {index}'s bounds must be finite with high above low, "
                f"got low {lows[index]} and high {highs[index]}"
            )
        object.__setattr__(self, "low", lows)
        object.__setattr__(self, "high", highs)

    @classmethod
    def of(
        cls,
        low: float | Sequence[float] | npt.NDArray[np.floating[Any]],
        high: float | Sequence[float] | npt.NDArray[np.floating[Any]],
        *,
        features: int | None = None,
    ) -> FeatureBounds:
        """Bounds from a number each (``features`` of them) or a list (or array) each."""
        lists = [int(np.size(side)) for side in (low, high) if np.ndim(side) > 0]
        count = features if features is not None else (lists[0] if lists else None)
        if count is None:
            raise ConfigError("give the number of features, or low or high as a list")
        if any(length != count for length in lists):
            raise ConfigError(f"low and high are lists of {count} values, one a feature")
        if count < 1:
            raise ConfigError(f"a statistics run counts at least one feature, got {count}")
        return cls(
            np.broadcast_to(np.asarray(low, np.float64), (count,)),
            np.broadcast_to(np.asarray(high, np.float64), (count,)),
        )

    @property
    def features(self) -> int:
        return int(self.low.size)

    @property
    def width(self) -> Array:
        return self.high - self.low

    def text(self) -> str:
        """The bounds as compact JSON: what a statistics run's tasks carry (:data:`BOUNDS_KEY`)."""
        return json.dumps(
            {"low": self.low.tolist(), "high": self.high.tolist()}, separators=(",", ":")
        )

    @classmethod
    def parse(cls, text: str) -> FeatureBounds:
        """The bounds ``text`` holds (:meth:`text`); a DataError says what is wrong with it."""
        data = object_of(text, what="the bounds", keys=("low", "high"), limit=MAX_SCALER_TEXT)
        try:
            return cls(floats(data["low"], what='"low"'), floats(data["high"], what='"high"'))
        except ConfigError as exc:
            raise DataError(str(exc)) from None


def bounds_of(extras: Mapping[str, Any]) -> FeatureBounds | None:
    """The feature bounds a statistics run's task carries (None: not a statistics run's); a
    ClientError when the coordinator sent bounds this client cannot use."""
    return from_extras(extras, BOUNDS_KEY, what="the task's feature bounds", parse=_parsed_bounds)


_parsed_bounds = cached(FeatureBounds.parse)


def moments_layout(features: int) -> Layout:
    """A statistics run's model: each feature's mean of ``u`` and of ``u**2``. Both are marked
    statistics: the coordinator's step there is the clients' mean, never a server optimizer's."""
    return Layout(
        (
            TensorSpec("mean", (features,), statistic=True),
            TensorSpec("mean_square", (features,), statistic=True),
        )
    )


def local_moments(features: npt.ArrayLike, bounds: FeatureBounds) -> tuple[np.ndarray, int]:
    """A client's moments (float32, :func:`moments_layout`'s order) and its record count.

    ``features`` holds records in rows, one column a feature; a value outside a feature's
    bounds counts as the bound. NaN and infinite values are refused (impute them first).
    """
    array = np.asarray(features)
    count = bounds.features
    if array.ndim != 2 or array.shape[1] != count:
        raise DataError(
            f"the local features have shape {list(array.shape)}, the statistics run counts "
            f"(records, {count})"
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DataError(f"the local features are {array.dtype}, not numbers")
    records = int(array.shape[0])
    if records == 0:
        return np.zeros(2 * count, np.float32), 0
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise DataError(
            "the local features hold NaN or infinite values: impute or drop them before a "
            "statistics run"
        )
    scaled = np.clip(values, bounds.low, bounds.high, out=values)  # in place: one copy in all
    scaled -= bounds.low
    scaled /= bounds.width
    mean = np.add.reduce(scaled, axis=0) / records
    square = np.einsum("ij,ij->j", scaled, scaled) / records
    return np.concatenate([mean, square]).astype(np.float32), records


@dataclass(frozen=True, slots=True)
class MomentsCheck:
    """What a client's moments must satisfy (each mean and mean square in [0, 1], the mean
    square between the mean's square and the mean), within ``tolerance``: the reason a vector
    fails, or None. The cohort's averaged moments satisfy it too, up to a secure sum's
    rounding (:data:`AGGREGATE_TOLERANCE`)."""

    features: int
    tolerance: float = _TOLERANCE

    def __call__(self, moments: np.ndarray) -> str | None:
        count = self.features
        if moments.shape != (2 * count,):
            return f"the moments have shape {list(moments.shape)}, the run counts {count} features"
        mean = moments[:count].astype(np.float64)
        square = moments[count:].astype(np.float64)
        tolerance = self.tolerance
        outside = -tolerance, 1 + tolerance
        checks = (
            ((mean < outside[0]) | (mean > outside[1]), "its mean is outside [0, 1]"),
            ((square < outside[0]) | (square > outside[1]), "its mean square is outside [0, 1]"),
            (square < mean * mean - tolerance, "its mean square is below its squared mean"),
            (square > mean + tolerance, "its mean square is above its mean"),
        )
        for wrong, why in checks:
            if wrong.any():
                index = int(np.flatnonzero(wrong)[0])
                return (
                    f"feature {index}: {why} (mean {mean[index]:.6g}, mean square "
                    f"{square[index]:.6g}): no records within the bounds give these moments"
                )
        return None


@dataclass(frozen=True, slots=True, eq=False)
class FeatureStatistics:
    """The population's feature statistics: each feature's mean and variance (of its values
    clipped into ``bounds``), over ``examples`` records of ``clients`` clients (None: not
    known)."""

    bounds: FeatureBounds
    mean: Array
    variance: Array
    examples: int | None = None
    clients: int | None = None
    resolution: float = RESOLUTION  # the smallest variance resolved, a share of the squared range

    @property
    def features(self) -> int:
        return self.bounds.features

    @property
    def std(self) -> Array:
        return np.sqrt(self.variance)

    @property
    def unresolved(self) -> list[int]:
        """The features whose variance is below what the moments resolve (``resolution`` of
        the squared range: :data:`RESOLUTION` for float32 moments, more where a secure sum's
        fixed point rounds coarser): their bounds are too wide for their spread (or the feature
        is constant); their standard deviation may be far off, or 0 (scaled by 1)."""
        width = self.bounds.width
        return [int(i) for i in np.flatnonzero(self.variance < self.resolution * width * width)]

    @classmethod
    def from_moments(
        cls,
        moments: npt.ArrayLike,
        bounds: FeatureBounds,
        *,
        examples: int | None = None,
        clients: int | None = None,
        resolution: float = RESOLUTION,
    ) -> FeatureStatistics:
        """The statistics the averaged moments give (each clipped into [0, 1] first: a secure
        sum's rounding may leave one a step outside)."""
        vector = np.asarray(moments, np.float64)
        count = bounds.features
        if vector.shape != (2 * count,):
            raise DataError(
                f"the moments of {count} features are {2 * count} values, got {vector.size}"
            )
        mean = np.clip(vector[:count], 0.0, 1.0)
        square = np.clip(vector[count:], 0.0, 1.0)
        width = bounds.width
        return cls(
            bounds,
            bounds.low + width * mean,
            width * width * np.maximum(square - mean * mean, 0.0),
            examples,
            clients,
            resolution,
        )

    def scaler(self) -> Scaler:
        """The scaler that standardizes with these statistics (a constant feature's scale 1)."""
        std = self.std
        return Scaler(self.mean, np.where(std > 0, std, 1.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "features": self.features,
            "examples": self.examples,
            "clients": self.clients,
            "low": self.bounds.low.tolist(),
            "high": self.bounds.high.tolist(),
            "mean": self.mean.tolist(),
            "variance": self.variance.tolist(),
            "std": self.std.tolist(),
            "resolution": self.resolution,
            "unresolved": self.unresolved,
        }

    def to_text(self) -> str:
        """:meth:`to_dict` as JSON, one key a line (each list on its key's line)."""
        fields = self.to_dict().items()
        lines = (f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in fields)
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, where: str = "the statistics"
    ) -> FeatureStatistics:
        """Statistics as :meth:`to_dict` wrote them; a DataError names what is wrong."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise DataError(f"{where} are not Shoal feature statistics (format {FORMAT!r})")
        low, high, mean, variance = (
            floats(data.get(key), what=repr(key)) for key in ("low", "high", "mean", "variance")
        )
        try:
            bounds = FeatureBounds(low, high)
        except ConfigError as exc:
            raise DataError(f"{where}: {exc}") from None
        if len(mean) != bounds.features or len(variance) != bounds.features:
            raise DataError(f"{where}: mean and variance are {bounds.features} values each")
        if any(value < 0 for value in variance):
            raise DataError(f"{where}: a variance is negative")
        counts = [data.get(key) for key in ("examples", "clients")]
        if any(c is not None and (isinstance(c, bool) or not isinstance(c, int)) for c in counts):
            raise DataError(f"{where}: examples and clients are whole numbers")
        (resolution,) = floats([data.get("resolution", RESOLUTION)], what="'resolution'")
        if not 0 < resolution <= 1:
            raise DataError(f"{where}: the resolution is a share of the squared range, in (0, 1]")
        return cls(bounds, np.array(mean), np.array(variance), counts[0], counts[1], resolution)


def read_statistics(path: str | Path) -> tuple[FeatureStatistics, str]:
    """The statistics in ``path`` (a ``statistics.json``, or a statistics run's folder that
    holds one) and the sha256 of the file's bytes; a ConfigError names what is wrong."""
    file = Path(path)
    if file.is_dir():
        file = file / STATISTICS_FILE
    try:
        with file.open("rb") as handle:
            data = handle.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"the feature statistics {file} cannot be read: {exc.strerror}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError(f"the feature statistics {file} are over {_MAX_FILE_BYTES:,} bytes")
    try:
        statistics = FeatureStatistics.from_dict(loads(data, what="it"), where=str(file))
    except DataError as exc:
        raise ConfigError(f"the feature statistics {file} cannot be used: {exc}") from None
    return statistics, hashlib.sha256(data).hexdigest()
