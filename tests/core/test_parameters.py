"""Flat parameter vectors: layouts, zero-copy views, dtypes, safetensors and sha256."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.core import (
    IntegrityError,
    Layout,
    ModelError,
    Parameters,
    TensorSpec,
    all_within,
    stack_vectors,
)

shapes = st.lists(
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), min_size=0, max_size=5
)


def sample(shape_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=shape).astype(np.float32) for shape in shape_list]


@given(shapes)
def test_round_trip_through_arrays_and_bytes(shape_list: list[tuple[int, ...]]) -> None:
    arrays = sample(shape_list)
    params = Parameters.from_arrays(arrays)
    assert len(params) == sum(array.size for array in arrays)
    for original, restored in zip(arrays, params.to_arrays(), strict=True):
        np.testing.assert_array_equal(original, restored)
    again = Parameters.from_bytes(params.to_bytes())
    assert again.layout == params.layout and again.sha256() == params.sha256()
    np.testing.assert_array_equal(again.vector, params.vector)


def test_views_share_memory_with_the_vector() -> None:
    params = Parameters.from_arrays(
        [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)], names=["w", "b"]
    )
    views = params.views()
    views["w"][1, 2] = 5.0
    assert params.vector[5] == 5.0
    assert np.shares_memory(views["b"], params.vector)
    assert np.shares_memory(params.to_arrays()[0], params.vector)  # float32 tensors are views


def test_original_dtypes_come_back() -> None:
    params = Parameters.from_arrays([np.arange(3, dtype=np.int64), np.ones(2, dtype=np.float64)])
    ints, floats = params.to_arrays()
    assert ints.dtype == np.int64 and floats.dtype == np.float64
    np.testing.assert_array_equal(ints, [0, 1, 2])


def test_empty_model() -> None:
    params = Parameters.from_arrays([])
    assert len(params) == 0 and params.views() == {}
    assert Parameters.from_bytes(params.to_bytes()).sha256() == params.sha256()


def test_sha256_depends_on_values_and_layout() -> None:
    base = Parameters.from_arrays([np.zeros(4)], names=["a"])
    assert base.sha256() != base.with_vector(np.ones(4, np.float32)).sha256()
    assert base.sha256() != Parameters.from_arrays([np.zeros((2, 2))], names=["a"]).sha256()


def test_payload_is_standard_safetensors() -> None:
    params = Parameters.from_arrays([np.ones((2, 2))], names=["layer.weight"])
    tensors = safetensors.numpy.load(params.to_bytes())
    np.testing.assert_array_equal(tensors["layer.weight"], np.ones((2, 2), np.float32))


def test_tampered_payload_is_rejected(tmp_path: Path) -> None:
    params = Parameters.from_arrays([np.ones(8)])
    data = bytearray(params.to_bytes())
    data[-1] ^= 0x01
    with pytest.raises(IntegrityError):
        Parameters.from_bytes(bytes(data))
    path = tmp_path / "model.safetensors"
    params.save(path)
    with pytest.raises(IntegrityError):
        Parameters.load(path, expected_sha256="0" * 64)
    assert Parameters.load(path).sha256() == params.sha256()


@pytest.mark.parametrize(
    "payload", [b"", b"garbage", b"\xff" * 8 + b"{}", (10**6).to_bytes(8, "little") + b"{}"]
)
def test_malformed_payload_is_a_model_error(payload: bytes) -> None:
    with pytest.raises(ModelError):
        Parameters.from_bytes(payload)


@pytest.mark.parametrize(
    ("vector", "layout"),
    [
        (np.zeros((2, 2), np.float32), Layout((TensorSpec("a", (4,)),))),
        (np.zeros(4, np.float64), Layout((TensorSpec("a", (4,)),))),
        (np.zeros(3, np.float32), Layout((TensorSpec("a", (4,)),))),
    ],
)
def test_inconsistent_vectors_are_refused(vector: np.ndarray, layout: Layout) -> None:
    with pytest.raises(ModelError):
        Parameters(vector, layout)


def test_layout_validation() -> None:
    with pytest.raises(ModelError, match="unique"):
        Layout((TensorSpec("a", (1,)), TensorSpec("a", (2,))))
    with pytest.raises(ModelError):
        TensorSpec("", (1,))
    with pytest.raises(ModelError):
        TensorSpec("a", (-1,))
    with pytest.raises(ModelError):
        TensorSpec("a", (1,), "not-a-dtype")
    with pytest.raises(ModelError):
        Parameters.from_arrays([np.array(["text"])])


def test_a_layouts_difference_names_the_first_tensor_that_differs() -> None:
    model = Layout((TensorSpec("w", (10, 64)), TensorSpec("b", (10,))))
    assert model.difference(model) is None
    assert model.difference(Layout(model.specs)) is None
    swapped = Layout((TensorSpec("b", (10,)), TensorSpec("w", (10, 64))))
    assert model.difference(swapped) == (
        "tensor 0 is 'w' [10, 64] float32 where 'b' [10] float32 was expected"
    )
    reshaped = Layout((TensorSpec("w", (64, 10)), TensorSpec("b", (10,))))
    assert "tensor 0 is 'w' [10, 64]" in str(model.difference(reshaped))
    wider = Layout((TensorSpec("w", (10, 64), "float64"), TensorSpec("b", (10,))))
    assert "float32 where 'w' [10, 64] float64" in str(model.difference(wider))
    assert model.difference(Layout(model.specs[:1])) == "2 tensors where 1 were expected"


def test_stack_vectors() -> None:
    items = [Parameters.from_arrays([np.full(3, value)]) for value in range(4)]
    assert stack_vectors(items).shape == (4, 3)
    with pytest.raises(ModelError):
        stack_vectors([])
    with pytest.raises(ModelError):
        stack_vectors([items[0], Parameters.from_arrays([np.zeros((3, 1))])])


float32_vectors = hnp.arrays(
    np.float32,
    st.integers(0, 64),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
)


@given(float32_vectors, st.floats(1e-30, 1e30))
@example(np.array([1.3056263e-25], np.float32), 1e-30)  # its square underflows to zero
def test_all_within_agrees_with_the_elementwise_test(vector: np.ndarray, bound: float) -> None:
    exact = bool(np.isfinite(vector).all() and (np.abs(vector) <= bound).all())
    assert all_within(vector, bound=bound) is exact


def test_all_within_on_the_edges() -> None:
    assert all_within(np.zeros(0, np.float32), bound=1.0)  # the empty case
    assert all_within(np.zeros(5, np.float32), bound=1e-30)
    ones = np.ones(10**6, np.float32)  # the norm (1000) is over the bound, every value is not
    assert all_within(ones, bound=1.0)
    assert not all_within(np.append(ones, np.float32(1.0001)), bound=1.0)
    assert not all_within(np.append(ones, np.float32("nan")), bound=1e30)
    assert not all_within(np.full(3, 1e30, np.float32), bound=1e6)  # the attack of issue 11
    with pytest.raises(ValueError, match="bound"):
        all_within(ones, bound=float("inf"))


@pytest.mark.parametrize("dtype", [",", "f4,f4", "(2,)f4", "O", "U10", "V8", "", "M8[s]"])
def test_a_layouts_dtype_is_a_plain_numbers(dtype: str) -> None:
    """A layout's dtype comes from a peer: numpy read "," through Python's parser (a
    SyntaxError out of a decode) and "f4,f4" as a record; each is a ModelError now."""
    with pytest.raises(ModelError, match="not a number's"):
        TensorSpec("w", (2,), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64", "<f8", "int64", "uint8", "bool"])
def test_the_dtypes_of_tensors_are_taken(dtype: str) -> None:
    assert TensorSpec("w", (2,), dtype).dtype == dtype
