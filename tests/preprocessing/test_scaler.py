"""The scaler a task carries: exact round trips, and whatever a hostile coordinator puts in
its place refused as one ClientError (the client reports a failed task and goes on)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core.errors import ClientError, DataError
from shoal.preprocessing import SCALER_KEY, Scaler, scaler_of
from shoal.preprocessing.scaler import MAX_SCALER_FEATURES, MAX_SCALER_TEXT
from shoal.tasks import EvaluateConfig, FitConfig

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
positive = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False)


@given(st.lists(st.tuples(finite, positive), min_size=1, max_size=20))
def test_a_scaler_reads_back_bit_for_bit(pairs: list[tuple[float, float]]) -> None:
    scaler = Scaler([mean for mean, _ in pairs], [scale for _, scale in pairs])
    back = Scaler.parse(scaler.text())
    assert back.mean.tobytes() == scaler.mean.tobytes()
    assert back.scale.tobytes() == scaler.scale.tobytes()


def test_a_task_carries_its_scaler_to_the_client() -> None:
    scaler = Scaler([1.0, 2.0], [0.5, 4.0])
    fit = FitConfig(round=1, extras={SCALER_KEY: scaler.text()})
    assert fit.scaler is not None
    np.testing.assert_allclose(fit.scaler.transform([[2.0, 6.0]]), [[2.0, 1.0]])
    assert fit.scaler is FitConfig(round=2, extras={SCALER_KEY: scaler.text()}).scaler  # once
    assert EvaluateConfig(round=1, extras={SCALER_KEY: scaler.text()}).scaler is not None
    assert FitConfig(round=1).scaler is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "is JSON text"),
        ("[1, 2]", "object of 'mean' and 'scale' only"),
        ('{"mean": [1], "scale": [1], "shift": [0]}', "object of 'mean' and 'scale' only"),
        ('{"mean": [NaN], "scale": [1]}', "is JSON text"),
        ('{"mean": [Infinity], "scale": [1]}', "is JSON text"),
        ('{"mean": [1e999], "scale": [1]}', "past a float's range"),
        ('{"mean": [1, 2], "scale": [1]}', "2 means and 1 scales"),
        ('{"mean": [1], "scale": [0]}', "feature 0's is 0.0"),
        ('{"mean": [1], "scale": [-2]}', "scale is positive"),
        ('{"mean": [], "scale": []}', "a list of 1 to"),
        ('{"mean": ["1"], "scale": [1]}', "is a list of numbers"),
        ('{"mean": [true], "scale": [1]}', "is a list of numbers"),
        ('{"mean": [[1]], "scale": [[1]]}', "is a list of numbers"),
        ("[" * 200_000, "RecursionError"),  # deeper than the parser goes
        ('{"mean": [' + "9" * 400 + '], "scale": [1]}', "past a float's range"),  # an int
        ('{"mean": [0], "scale": [5e-324]}', "its inverse finite"),  # would divide to inf
    ],
)
def test_a_hostile_scaler_is_one_client_error(text: str, message: str) -> None:
    with pytest.raises(ClientError, match=message) as caught:
        _ = FitConfig(round=1, extras={SCALER_KEY: text}).scaler
    assert str(caught.value).startswith("the task's scaler cannot be used")


def test_a_scaler_that_is_not_text_is_refused() -> None:
    with pytest.raises(ClientError, match="the task's scaler came as int, not text"):
        scaler_of({SCALER_KEY: 7})


def test_an_oversized_scaler_is_refused_before_it_is_parsed() -> None:
    text = json.dumps({"mean": [0.0] * (MAX_SCALER_FEATURES + 1), "scale": [1.0]})
    assert len(text) <= MAX_SCALER_TEXT  # the count, then
    with pytest.raises(ClientError, match="a list of 1 to 65,536 numbers"):
        scaler_of({SCALER_KEY: text})
    with pytest.raises(ClientError, match="over the limit"):
        scaler_of({SCALER_KEY: " " * (MAX_SCALER_TEXT + 1)})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((2, 3)), r"standardizes 2 features, the data has shape \[2, 3\]"),
        (np.float64(1.0), "the data has shape"),
        (np.array([["a", "b"]]), "standardizes numbers"),
    ],
)
def test_data_of_another_shape_is_refused(data: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Scaler([0.0, 0.0], [1.0, 1.0]).transform(data)
