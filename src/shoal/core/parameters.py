"""Model parameters as one flat float32 vector plus a layout of named tensors.

Every stage of Shoal (aggregation, clipping, noise, masking, compression)
works on the flat vector; the layout gives zero-copy per-tensor views and
restores the original dtypes on the way out. Serialization is safetensors,
with a sha256 of the content stored beside the tensors and checked on load.

>>> params = Parameters.from_arrays([np.ones((2, 3)), np.zeros(3)], names=["w", "b"])
>>> params.vector.shape
(9,)
>>> params.views()["w"].shape
(2, 3)
"""

from __future__ import annotations

import hashlib
import json
import math
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors
import safetensors.numpy
from scipy.linalg import blas as scipy_blas  # type: ignore[import-untyped]

from shoal.core.errors import IntegrityError, ModelError

Vector = npt.NDArray[np.float32]

_SHA_KEY = "shoal.sha256"
_LAYOUT_KEY = "shoal.layout"
_FORMAT_KEY = "format"


STATISTIC = "statistic"
"""The mark of a :attr:`TensorSpec.statistic` in a layout's JSON (a fourth element)."""

_DTYPE_CHARACTERS = frozenset(string.ascii_letters + string.digits + "<>=|")


def _number_dtype(name: str) -> np.dtype[Any] | None:
    """The plain numeric (or boolean) dtype ``name`` names, else None. A layout's dtype comes
    from a peer: numpy reads ``","`` or ``"(2,)f4"`` as structured dtypes through Python's
    parser (a ``SyntaxError`` out of a decode), and ``"O"`` as objects."""
    if not name or not set(name) <= _DTYPE_CHARACTERS:
        return None
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError, SyntaxError):
        return None
    plain = dtype.fields is None and dtype.subdtype is None
    return dtype if plain and (np.issubdtype(dtype, np.number) or dtype == np.bool_) else None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named tensor inside a flat vector: its shape and original dtype.

    ``statistic`` marks state that training measures rather than descends (BatchNorm's running
    mean and variance): the coordinator averages it, and no server optimizer steps it (a server
    momentum drove a running variance below 0; see :attr:`Layout.statistics`).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    statistic: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ModelError("a tensor needs a non-empty name")
        if any(dim < 0 for dim in self.shape):
            raise ModelError(f"tensor {self.name!r} has a negative dimension: {self.shape}")
        if _number_dtype(self.dtype) is None:
            raise ModelError(
                f"tensor {self.name!r} has a dtype that is not a number's: {self.dtype[:40]!r}"
            )

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class Layout:
    """The ordered tensors that make up a flat parameter vector."""

    specs: tuple[TensorSpec, ...]
    size: int = field(init=False, repr=False, compare=False)
    untrained: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    """The [start, end) of each tensor that is not floating point: an integer counter (BatchNorm's
    ``num_batches_tracked``) or a boolean mask. Gradient descent trains none of them and an
    average of them means nothing, so an update leaves them as they are (:func:`untrained_zeroed`):
    BatchNorm's counter, a step count, dominated every update's norm (136 after 136 batches),
    and the update policy, DP clipping and SecAgg+'s clip spent themselves on it."""

    statistics: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    """The [start, end) of each floating-point tensor marked a :attr:`TensorSpec.statistic`:
    the coordinator's step there is the clients' mean update (:func:`statistics_averaged`)."""

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            duplicated = sorted({name for name in names if names.count(name) > 1})
            raise ModelError(f"tensor names must be unique, repeated: {duplicated}")
        object.__setattr__(self, "size", sum(spec.size for spec in self.specs))
        untrained, statistics = [], []
        for spec, span in zip(self.specs, self.offsets(), strict=True):
            if span[1] == span[0]:
                continue
            if not np.issubdtype(np.dtype(spec.dtype), np.floating):
                untrained.append(span)
            elif spec.statistic:
                statistics.append(span)
        object.__setattr__(self, "untrained", tuple(untrained))
        object.__setattr__(self, "statistics", tuple(statistics))

    def with_statistics(self, names: Iterable[str]) -> Layout:
        """This layout with the tensors ``names`` marked as statistics (others unmarked)."""
        marked = set(names)
        return Layout(tuple(replace(spec, statistic=spec.name in marked) for spec in self.specs))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs)

    def offsets(self) -> list[tuple[int, int]]:
        """The [start, end) slice of each tensor in the flat vector, in order."""
        spans, start = [], 0
        for spec in self.specs:
            spans.append((start, start + spec.size))
            start += spec.size
        return spans

    def to_json(self) -> str:
        return json.dumps(
            [
                [spec.name, list(spec.shape), spec.dtype, *([STATISTIC] if spec.statistic else [])]
                for spec in self.specs
            ],
            separators=(",", ":"),
        )

    def difference(self, other: Layout) -> str | None:
        """The first way this layout differs from ``other``, the expected one (the number of
        tensors, then a name, a shape or a dtype, in order), or None when the two are the same.
        Which tensors are statistics is the model's to say, not an update's: not compared."""
        if len(self.specs) != len(other.specs):
            return f"{len(self.specs)} tensors where {len(other.specs)} were expected"
        for index, (mine, theirs) in enumerate(zip(self.specs, other.specs, strict=True)):
            if (mine.name, mine.shape, mine.dtype) != (theirs.name, theirs.shape, theirs.dtype):
                return (
                    f"tensor {index} is {mine.name!r} {list(mine.shape)} {mine.dtype} where "
                    f"{theirs.name!r} {list(theirs.shape)} {theirs.dtype} was expected"
                )
        return None

    @classmethod
    def from_json(cls, text: str) -> Layout:
        """The layout :meth:`to_json` wrote: a list of ``[name, [dims...], dtype]``, each
        dimension a JSON integer (anything else is refused with a :class:`ModelError`)."""
        try:
            rows = json.loads(text)
        except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: deep nesting
            raise ModelError(f"malformed layout: {str(exc)[:200]}") from None
        if not isinstance(rows, list):
            raise ModelError("malformed layout: not a list of [name, shape, dtype]")
        specs = []
        for index, row in enumerate(rows):
            if not (
                isinstance(row, list)
                and len(row) in (3, 4)
                and isinstance(row[0], str)
                and isinstance(row[1], list)
                and all(type(dim) is int for dim in row[1])
                and isinstance(row[2], str)
                and row[3:] in ([], [STATISTIC])
            ):
                raise ModelError(
                    f"malformed layout: entry {index} is not [name, [integers], dtype] "
                    f'(and "{STATISTIC}" for a statistic)'
                )
            specs.append(TensorSpec(row[0], tuple(row[1]), row[2], statistic=len(row) == 4))
        return cls(tuple(specs))

    @classmethod
    def of_arrays(
        cls, arrays: Sequence[npt.ArrayLike], names: Sequence[str] | None = None
    ) -> Layout:
        tensors = [np.asarray(array) for array in arrays]
        if names is None:
            names = [f"tensor_{index}" for index in range(len(tensors))]
        if len(names) != len(tensors):
            raise ModelError(f"{len(names)} names for {len(tensors)} arrays")
        return cls(
            tuple(
                TensorSpec(name, tuple(tensor.shape), tensor.dtype.name)
                for name, tensor in zip(names, tensors, strict=True)
            )
        )


class Parameters:
    """A flat float32 vector and the layout that names its pieces.

    The vector is owned: operations that produce new values return new
    ``Parameters`` (see :meth:`with_vector`); views share its memory.
    """

    __slots__ = ("layout", "vector")

    def __init__(self, vector: npt.ArrayLike, layout: Layout) -> None:
        array = np.asarray(vector)
        if array.ndim != 1:
            raise ModelError(f"a parameter vector must be 1-D, got shape {array.shape}")
        if array.dtype != np.float32:
            raise ModelError(f"a parameter vector must be float32, got {array.dtype}")
        if array.size != layout.size:
            raise ModelError(
                f"vector has {array.size} values but the layout describes {layout.size}"
            )
        self.vector: Vector = np.ascontiguousarray(array)
        self.layout = layout

    def __repr__(self) -> str:
        return f"Parameters({len(self.layout.specs)} tensors, {self.layout.size} values)"

    def __len__(self) -> int:
        return int(self.vector.size)

    @classmethod
    def from_arrays(
        cls, arrays: Sequence[npt.ArrayLike], names: Sequence[str] | None = None
    ) -> Parameters:
        """Flatten a list of arrays (any real dtype) into one float32 vector."""
        tensors = [np.asarray(array) for array in arrays]
        for tensor in tensors:
            if not (np.issubdtype(tensor.dtype, np.number) or tensor.dtype == np.bool_):
                raise ModelError(f"cannot flatten an array of dtype {tensor.dtype}")
        layout = Layout.of_arrays(tensors, names)
        if not tensors:
            return cls(np.zeros(0, dtype=np.float32), layout)
        vector = np.concatenate([tensor.astype(np.float32).ravel() for tensor in tensors])
        return cls(vector, layout)

    @classmethod
    def from_mapping(cls, tensors: Mapping[str, npt.ArrayLike]) -> Parameters:
        """Flatten a name-to-array mapping, keeping its iteration order."""
        return cls.from_arrays(list(tensors.values()), names=list(tensors.keys()))

    @classmethod
    def zeros(cls, layout: Layout) -> Parameters:
        return cls(np.zeros(layout.size, dtype=np.float32), layout)

    def with_vector(self, vector: npt.ArrayLike) -> Parameters:
        """New parameters with the same layout and another vector."""
        return Parameters(vector, self.layout)

    def copy(self) -> Parameters:
        return Parameters(self.vector.copy(), self.layout)

    def views(self) -> dict[str, Vector]:
        """Zero-copy float32 views of each tensor, shaped as the layout says."""
        return {
            spec.name: self.vector[start:end].reshape(spec.shape)
            for spec, (start, end) in zip(self.layout.specs, self.layout.offsets(), strict=True)
        }

    def to_arrays(self) -> list[np.ndarray]:
        """Each tensor in its original dtype (a view when that dtype is float32)."""
        arrays = []
        for spec, view in zip(self.layout.specs, self.views().values(), strict=True):
            if spec.dtype == "float32":
                arrays.append(view)
            elif np.issubdtype(np.dtype(spec.dtype), np.integer):
                arrays.append(np.rint(view).astype(spec.dtype))
            else:
                arrays.append(view.astype(spec.dtype))
        return arrays

    def sha256(self) -> str:
        """The sha256 of the layout and the vector's little-endian bytes."""
        digest = hashlib.sha256(self.layout.to_json().encode())
        digest.update(b"\0")
        digest.update(self.vector.astype("<f4", copy=False).tobytes())
        return digest.hexdigest()

    def to_bytes(
        self, metadata: Mapping[str, str] | None = None, *, content_sha256: bool = True
    ) -> bytes:
        """Serialize as safetensors; the layout and sha256 travel in the metadata.

        ``content_sha256=False`` leaves the content hash out, for a payload
        whose bytes are hashed anyway (an upload, verified by its
        ``payload_sha256``): it is then hashed once on each side.
        """
        header = dict(metadata or {})
        header.update({_FORMAT_KEY: "shoal", _LAYOUT_KEY: self.layout.to_json()})
        if content_sha256:
            header[_SHA_KEY] = self.sha256()
        tensors = {name: np.ascontiguousarray(view) for name, view in self.views().items()}
        return safetensors.numpy.save(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_sha256: str | None = None) -> Parameters:
        """Deserialize safetensors bytes and verify the content's sha256."""
        try:
            tensors = safetensors.numpy.load(data)
            metadata = _read_metadata(data)
        except (safetensors.SafetensorError, ValueError, KeyError, OSError) as exc:
            raise ModelError(f"not a readable safetensors payload: {exc}") from exc
        if _LAYOUT_KEY in metadata:
            layout = Layout.from_json(metadata[_LAYOUT_KEY])
        else:
            layout = Layout.of_arrays(list(tensors.values()), list(tensors.keys()))
        missing = [name for name in layout.names if name not in tensors]
        if missing:
            raise ModelError(f"payload lacks tensors named in its layout: {missing}")
        params = cls.from_arrays([tensors[name] for name in layout.names], names=layout.names)
        params = cls(params.vector, layout)
        for claimed in (metadata.get(_SHA_KEY), expected_sha256):
            if claimed is not None and claimed != params.sha256():
                raise IntegrityError(
                    f"sha256 mismatch: content hashes to {params.sha256()[:16]}..., "
                    f"expected {claimed[:16]}..."
                )
        return params

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
        """Write a safetensors file atomically; returns the content sha256."""
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(self.to_bytes(metadata))
        partial.replace(target)
        return self.sha256()

    @classmethod
    def load(cls, path: str | Path, *, expected_sha256: str | None = None) -> Parameters:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read parameters from {path}: {exc}") from exc
        return cls.from_bytes(data, expected_sha256=expected_sha256)


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` block of a safetensors payload's JSON header."""
    if len(data) < 8:
        raise ValueError("payload shorter than a safetensors header")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        raise ValueError("safetensors header runs past the end of the payload")
    header = json.loads(data[8 : 8 + header_size])
    metadata = header.get("__metadata__") or {}
    return {str(key): str(value) for key, value in metadata.items()}


def statistics_averaged(step: Vector, mean: Vector, layout: Layout) -> Vector:
    """A server optimizer's ``step`` with the layout's :attr:`~Layout.statistics` taken from the
    clients' ``mean`` update: a running statistic is averaged, never stepped by a momentum
    or an adaptive rate (``step`` itself when the layout has none)."""
    if not layout.statistics:
        return step
    step = np.array(step, dtype=np.float32)
    for start, end in layout.statistics:
        step[start:end] = mean[start:end]
    return step


def untrained_zeroed(update: Vector, layout: Layout) -> Vector:
    """``update`` with the layout's :attr:`~Layout.untrained` tensors' entries 0 (``update``
    itself when it has none)."""
    if not layout.untrained:
        return update
    update = update.copy()
    for start, end in layout.untrained:
        update[start:end] = 0
    return update


def all_finite(vector: npt.NDArray[np.floating[Any]]) -> bool:
    """Whether a vector holds no NaN and no infinity, in one fast pass.

    A dot product propagates NaN and infinity, and reads the vector once
    without allocating; only when it overflows (huge but finite values) does
    the exact elementwise test run.
    """
    if vector.size == 0:
        return True
    if (
        vector.dtype == np.float32
        and vector.ndim == 1
        and math.isfinite(scipy_blas.sdot(vector, vector))
    ):
        return True  # BLAS overflows silently, where numpy's dot would warn
    return bool(np.isfinite(vector).all())


def all_within(vector: npt.NDArray[np.floating[Any]], *, bound: float) -> bool:
    """Whether every value of a vector is finite and at most ``bound`` in magnitude.

    >>> all_within(np.array([0.5, -2.0], np.float32), bound=2.0)
    True

    No value exceeds the vector's L2 norm, and one BLAS dot gives the squared
    norm in one pass without allocating (as in :func:`all_finite`). A float32 dot
    product of n terms is off by a relative error of at most
    ``gamma = n u / (1 - n u)`` (``u = 2**-24``, in any order of summation) and
    underflow loses at most ``2**-126`` a term, so when even the largest true
    sum that these allow is within ``bound**2``, every value is. Otherwise (a
    large update, NaN or infinity, a vector of over 2**23 values) the exact
    test reads the vector's minimum and maximum, which NaN and infinity fail.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a finite positive number, got {bound}")
    if vector.size == 0:
        return True
    if vector.dtype == np.float32 and vector.ndim == 1:
        rounding = vector.size * 2.0**-24  # n u; 1 / (1 - gamma) = (1 - n u) / (1 - 2 n u)
        if rounding < 0.5:
            # plus what underflow can lose: at most 2**-126 a term, even flushed to zero
            squares = float(scipy_blas.sdot(vector, vector)) + vector.size * 2.0**-126
            if squares * (1 - rounding) / (1 - 2 * rounding) <= bound * bound:
                return True
    return bool(-bound <= vector.min() and vector.max() <= bound)


def stack_vectors(parameters: Iterable[Parameters]) -> npt.NDArray[np.float32]:
    """Stack the vectors of parameters sharing one layout into a (K, P) matrix."""
    items = list(parameters)
    if not items:
        raise ModelError("cannot stack an empty list of parameters")
    layout = items[0].layout
    for item in items[1:]:
        if item.layout != layout:
            raise ModelError("cannot stack parameters with different layouts")
    return np.stack([item.vector for item in items])
