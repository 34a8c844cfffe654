"""The JSON texts of federated preprocessing (a task's scaler and bounds, a statistics file),
read strictly: no NaN or Infinity, no number past a float's range, nothing too deep."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from shoal.core.errors import ClientError, DataError

T = TypeVar("T")


def loads(text: str | bytes, *, what: str) -> Any:
    """The JSON value of ``text``; a DataError says why ``what`` is not JSON text."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # "[[[[...": too deep for the parser
        raise DataError(f"{what} is JSON text: {type(exc).__name__}: {exc}") from None


def object_of(text: str, *, what: str, keys: tuple[str, ...], limit: int) -> dict[str, Any]:
    """The JSON object ``text`` holds, whose keys are ``keys`` exactly; a DataError says why
    ``what`` is not one (text over ``limit`` characters is not read)."""
    if len(text) > limit:
        raise DataError(f"{what} is {len(text):,} characters of text, over the limit")
    data = loads(text, what=what)
    if not isinstance(data, dict) or set(data) != set(keys):
        raise DataError(f"{what} is a JSON object of {' and '.join(map(repr, keys))} only")
    return data


def cached(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse``, remembering the last few texts it read (a client gets the same text with
    every task of a run)."""
    return functools.lru_cache(maxsize=8)(parse)


def from_extras(
    extras: Mapping[str, Any], key: str, *, what: str, parse: Callable[[str], T]
) -> T | None:
    """What a task's ``extras`` carry under ``key``, read by ``parse`` (None: nothing); a
    ClientError when the coordinator sent something this client cannot use."""
    text = extras.get(key)
    if text is None:
        return None
    if not isinstance(text, str):
        raise ClientError(f"{what} came as {type(text).__name__}, not text")
    try:
        return parse(text)
    except DataError as exc:
        raise ClientError(f"{what} cannot be used: {exc}") from None


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
