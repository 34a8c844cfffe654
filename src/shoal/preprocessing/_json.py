"""The JSON texts of federated preprocessing (a task's scaler and bounds, a statistics file),
read strictly: no NaN or Infinity, no number past a float's range, nothing too deep."""

from __future__ import annotations

import json
import math
from typing import Any

from shoal.core.errors import DataError


def loads(text: str | bytes, *, what: str) -> Any:
    """The JSON value of ``text``; a DataError says why ``what`` is not JSON text."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # "[[[[...": too deep for the parser
        raise DataError(f"{what} is JSON text: {type(exc).__name__}: {exc}") from None


def floats(values: object, *, what: str) -> list[float]:
    """``values`` as a list of finite floats; a DataError when it is not a list of numbers
    (booleans are not numbers) or holds one past a float's range."""
    if not isinstance(values, list) or not all(
        isinstance(value, int | float) and not isinstance(value, bool) for value in values
    ):
        raise DataError(f"{what} is a list of numbers")
    try:
        converted = [float(value) for value in values]
    except OverflowError:  # an integer of 400 digits
        converted = [math.inf]
    if not all(math.isfinite(value) for value in converted):
        raise DataError(f"{what} holds a number past a float's range")
    return converted


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")
