"""The scaler a training run sends with every task: each feature's mean and scale.

A client standardizes its features with it (``(x - mean) / scale``) before it trains
or evaluates, so every client, and the coordinator's central evaluation, feeds the
model the same transformation of the same raw values. It travels in a task's extras
under :data:`SCALER_KEY` as compact JSON text; :attr:`shoal.tasks.FitConfig.scaler`
reads it back (once per text: a client sees the same text every round).

>>> scaler = Scaler([10.0, 0.0], [2.0, 1.0])
>>> scaler.transform([[12.0, 3.0]]).tolist()
[[1.0, 3.0]]
>>> Scaler.parse(scaler.text()).mean.tolist()
[10.0, 0.0]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.core.errors import DataError
from shoal.preprocessing._json import cached, floats, from_extras, object_of

SCALER_KEY = "shoal_scaler"
"""The task extras key a run's scaler travels under (the coordinator's, never an app's)."""

MAX_SCALER_FEATURES = 65_536
MAX_SCALER_TEXT = MAX_SCALER_FEATURES * 2 * 26 + 64  # two shortest round-trip floats a feature

Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True, eq=False)
class Scaler:
    """Each feature's ``mean`` and ``scale`` (its standard deviation; 1 where that was 0)."""

    mean: Array
    scale: Array

    def __init__(self, mean: npt.ArrayLike, scale: npt.ArrayLike) -> None:
        means = _vector(mean, "mean")
        scales = _vector(scale, "scale")
        if means.shape != scales.shape:
            raise DataError(
                f"a scaler has {means.size} means and {scales.size} scales: one of each a feature"
            )
        with np.errstate(divide="ignore", over="ignore"):
            usable = (scales > 0) & np.isfinite(1.0 / scales)  # 5e-324 would divide to inf
        if not usable.all():
            index = int(np.flatnonzero(~usable)[0])
            raise DataError(
                f"a scaler's scale is positive and its inverse finite, feature {index}'s is "
                f"{scales[index]}"
            )
        object.__setattr__(self, "mean", means)
        object.__setattr__(self, "scale", scales)

    @property
    def features(self) -> int:
        return int(self.mean.size)

    def transform(self, features: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """``features`` (records in rows, one column a feature) standardized, as float32."""
        values = np.asarray(features)
        if values.ndim == 0 or values.shape[-1] != self.features:
            raise DataError(
                f"the scaler standardizes {self.features} features, the data has shape "
                f"{list(values.shape)} (records in rows, one column a feature)"
            )
        if not np.issubdtype(values.dtype, np.number):
            raise DataError(f"the scaler standardizes numbers, the data is {values.dtype}")
        return ((values - self.mean) / self.scale).astype(np.float32)

    def text(self) -> str:
        """The scaler as compact JSON (each float the shortest text that reads back exactly)."""
        return json.dumps(
            {"mean": self.mean.tolist(), "scale": self.scale.tolist()}, separators=(",", ":")
        )

    @property
    def sha256(self) -> str:
        """The sha256 of :meth:`text`: what a model version's signature covers of it."""
        return sha256_text(self.text())

    @classmethod
    def parse(cls, text: str) -> Scaler:
        """The scaler ``text`` holds (:meth:`text`); a DataError says what is wrong with it."""
        data = object_of(text, what="a scaler", keys=("mean", "scale"), limit=MAX_SCALER_TEXT)
        return cls(
            floats(data["mean"], what='a scaler\'s "mean"'),
            floats(data["scale"], what='a scaler\'s "scale"'),
        )


def sha256_text(text: str) -> str:
    """The sha256 of a task's scaler text, as a client hashes what it received."""
    return hashlib.sha256(text.encode()).hexdigest()


def scaler_of(extras: Mapping[str, Any]) -> Scaler | None:
    """The scaler a task's ``extras`` carry (None: the run has none); a ClientError when the
    coordinator sent one this client cannot use."""
    return from_extras(extras, SCALER_KEY, what="the task's scaler", parse=_parsed)


_parsed = cached(Scaler.parse)


def _vector(values: npt.ArrayLike, what: str) -> Array:
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"a scaler's {what} is numbers: {exc}") from None
    if array.ndim != 1 or not 1 <= array.size <= MAX_SCALER_FEATURES:
        raise DataError(
            f"a scaler's {what} is a list of 1 to {MAX_SCALER_FEATURES:,} numbers, "
            f"got shape {list(array.shape)}"
        )
    if not np.isfinite(array).all():
        raise DataError(f"a scaler's {what} holds NaN or infinite values")
    return array
