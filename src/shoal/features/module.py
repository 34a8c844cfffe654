"""A feature module, checked against the ``shoal-features`` ABI and run in a wasmtime sandbox.

:class:`FeatureModule` takes a WebAssembly binary (or its text), reads its manifest, compiles
it and checks its interface before running any of it: no imports at all, a ``memory``, and
``shoal_alloc`` and ``shoal_extract`` of the contract's exact types; anything else is a
:class:`ConfigError` of one line. :meth:`FeatureModule.extract` runs it on records in
batches, each in a fresh instance with a fuel budget and a memory cap (:class:`FeatureLimits`),
and turns whatever goes wrong there (a trap, a failure code, an output that is not finite or
does not fit in float32) into a :class:`DataError` naming the module and the record.

The process holds one wasmtime engine (fuel metering and NaN canonicalization on, relaxed
SIMD deterministic, threads, multiple memories and GC off) and the modules it compiled, by
sha256: a feature module pickles as its bytes and limits, and compiles once in each process.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from shoal.core.errors import ConfigError, FeatureError, MissingExtraError
from shoal.features.isolated import compile_in_child
from shoal.features.manifest import read_manifest

if TYPE_CHECKING:
    import wasmtime

Features = npt.NDArray[np.float32]
Records = npt.NDArray[np.float64]

_ALIGNMENT = 8
_ABI_FLOAT = np.dtype(np.float64).newbyteorder("<")
_LARGEST_EXACT = 2**53  # integers beyond it are not all exact in float64
_LARGEST_REGION = 2**31 - 1  # shoal_alloc takes its size as an i32
_LARGEST_MEMORY = 2**32  # what a 32-bit memory can address
_MOST_TABLES = 4  # toolchains emit one (for indirect calls); tables share the memory cap
_CACHED_MODULES = 64
_SHOWN_COLUMNS = 20
_SIGNATURES = {"shoal_alloc": (["i32"], ["i32"]), "shoal_extract": (["i32"] * 3, ["i32"])}


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureLimits:
    """What one batch of a feature module may use: fuel (``fuel_base`` for instantiating and
    allocating, plus ``fuel_per_record`` a record), linear memory in bytes, records a batch,
    the size of the module's binary, and what compiling a module from a peer may take. Each
    is a positive integer: ``[features]`` keys."""

    fuel_per_record: int = 100_000
    fuel_base: int = 10_000_000
    memory_bytes: int = 64 * 2**20
    batch_records: int = 4096
    max_module_bytes: int = 16 * 2**20
    # compiling a module from a peer (``isolated``): a child process's CPU seconds and bytes
    compile_seconds: int = 30
    compile_memory_bytes: int = 2 * 2**30

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value <= 0:
                raise ConfigError(
                    f"feature limit {field.name} must be a positive integer: {value!r}"
                )
        if self.memory_bytes > _LARGEST_MEMORY:
            raise ConfigError(
                f"a feature module's memory cap of {self.memory_bytes:,} bytes is over the "
                "4 GiB that a 32-bit WebAssembly memory addresses"
            )
        if self.fuel_base + self.fuel_per_record * self.batch_records >= 2**64:
            raise ConfigError(
                "feature limits: fuel_base + fuel_per_record * batch_records is 2**64+"
            )


_DEFAULT_LIMITS = FeatureLimits()


class FeatureModule:
    """A feature module that passed the ABI's checks, ready to compute features.

    >>> module = FeatureModule.load("features/clicks.wasm")  # doctest: +SKIP
    >>> module.extract({"clicks": [3, 0], "views": [10, 4]})  # doctest: +SKIP
    array([[0.3, 0. ]], dtype=float32)
    """

    __slots__ = ("limits", "manifest", "sha256", "wasm")

    def __init__(
        self, wasm: bytes, *, limits: FeatureLimits = _DEFAULT_LIMITS, isolated: bool = False
    ) -> None:
        if len(wasm) > limits.max_module_bytes:
            raise ConfigError(
                f"feature module of {len(wasm):,} bytes is over the limit on a module's size, "
                f"{limits.max_module_bytes:,} bytes"
            )
        self.wasm = bytes(wasm)
        self.sha256 = hashlib.sha256(self.wasm).hexdigest()
        self.manifest = read_manifest(self.wasm)
        self.limits = limits
        if isolated:
            _RUNTIME.compile_isolated(self.wasm, self.sha256, limits, label=self._label)
        _check_interface(self._compiled(), self._label, limits)

    @classmethod
    def from_bytes(
        cls, data: bytes, *, limits: FeatureLimits = _DEFAULT_LIMITS, isolated: bool = False
    ) -> FeatureModule:
        """The feature module of the WebAssembly binary ``data``, checked against the ABI;
        ``isolated``: compiled in a child process within ``limits``' compile limits (a module
        from a peer: :mod:`shoal.features.isolated`)."""
        return cls(data, limits=limits, isolated=isolated)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, limits: FeatureLimits = _DEFAULT_LIMITS
    ) -> FeatureModule:
        """The feature module in the file ``path``: WebAssembly text if its name ends in
        ``.wat``, a binary otherwise (read no further than the size limit)."""
        path = Path(path)
        text = path.suffix == ".wat"
        try:
            with path.open("rb") as file:
                data = file.read(-1 if text else limits.max_module_bytes + 1)
        except OSError as exc:
            raise ConfigError(f"feature module {str(path)!r} cannot be read: {exc}") from exc
        return cls(_text_to_binary(data, path) if text else data, limits=limits)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.manifest.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.manifest.outputs

    def extract(self, records: Any) -> Features:
        """The features of ``records`` as float32, a row a record and a column an output.

        ``records`` is a 2-D array-like of the manifest's inputs in order, or a mapping of
        column name to 1-D array-like (a dict, a pandas DataFrame) whose inputs are taken by
        name, other columns ignored. Integers over 2**53 in magnitude are refused; NaN is
        passed on for the module to handle.
        """
        matrix = _records_matrix(records, self.inputs, self._label)
        features = np.empty((len(matrix), len(self.outputs)), dtype=np.float32)
        if not len(matrix):
            return features
        compiled = self._compiled()
        row_bytes = (len(self.inputs) + len(self.outputs)) * 8
        step = min(self.limits.batch_records, _LARGEST_REGION // row_bytes)
        for start in range(0, len(matrix), step):
            outputs = self._run(compiled, matrix[start : start + step], start)
            features[start : start + len(outputs)] = self._checked(outputs, start)
        return features

    def __reduce__(self) -> tuple[Any, tuple[bytes, FeatureLimits]]:
        return _restore, (self.wasm, self.limits)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureModule):
            return NotImplemented
        return (self.sha256, self.limits) == (other.sha256, other.limits)

    def __hash__(self) -> int:
        return hash((self.sha256, self.limits))

    def __repr__(self) -> str:
        return f"FeatureModule({self.name!r}, {self.version!r}, sha256={self.sha256[:12]!r})"

    @property
    def _label(self) -> str:
        return f"{self.manifest.name!r} {self.manifest.version}"

    def _compiled(self) -> wasmtime.Module:
        return _RUNTIME.compile(self.wasm, self.sha256, label=self._label)

    def _run(self, compiled: wasmtime.Module, batch: Records, start: int) -> Records:
        """The outputs of one batch, computed in a fresh instance of ``compiled``."""
        api = _wasmtime()
        count, inputs_size = len(batch), batch.size
        size = (inputs_size + count * len(self.outputs)) * 8
        store = _RUNTIME.store(self.limits, fuel=self.limits.fuel_per_record * count)
        try:
            exports = api.Instance(store, compiled, []).exports(store)
            memory, alloc = exports["memory"], exports["shoal_alloc"]
            pointer = alloc(store, size) & 0xFFFFFFFF  # an i32 comes back signed
            region = self._region(memory, store, pointer, size, start, count)
            region[:inputs_size] = batch.reshape(-1)
            region[inputs_size:] = np.nan
            outputs = pointer + inputs_size * 8
            code = exports["shoal_extract"](store, _as_i32(pointer), _as_i32(outputs), count)
            region = self._region(memory, store, pointer, size, start, count)  # it may move
            result = region[inputs_size:].reshape(count, len(self.outputs)).copy()
        except (api.Trap, api.WasmtimeError) as exc:
            raise FeatureError(self._trap_message(exc, start, count)) from exc
        if 1 <= code <= count:
            raise FeatureError(
                f"feature module {self._label} cannot compute record {start + code - 1}"
            )
        if code != 0:
            raise FeatureError(
                f"feature module {self._label} failed with code {code} on {_span(start, count)}"
            )
        return result

    def _region(
        self, memory: Any, store: wasmtime.Store, pointer: int, size: int, start: int, count: int
    ) -> Records:
        """The batch's region of linear memory as float64, checked to lie inside it."""
        if pointer % _ALIGNMENT:
            raise FeatureError(
                f"feature module {self._label}: shoal_alloc returned {pointer:#x} for "
                f"{_span(start, count)}, which is not {_ALIGNMENT}-byte aligned"
            )
        length = memory.data_len(store)
        if pointer + size > length:
            raise FeatureError(
                f"feature module {self._label}: shoal_alloc returned {pointer:#x} for {size:,} "
                f"bytes ({_span(start, count)}), past the end of its {length:,}-byte memory"
            )
        return np.frombuffer(memoryview(memory.get_buffer_ptr(store, size, pointer)), _ABI_FLOAT)

    def _checked(self, outputs: Records, start: int) -> Features:
        """``outputs`` as float32, each one finite and in float32's range."""
        with np.errstate(over="ignore"):
            features = outputs.astype(np.float32)
        bad = ~np.isfinite(features)
        if bad.any():
            record, column = (int(index) for index in np.argwhere(bad)[0])
            value = float(outputs[record, column])
            why = (
                "NaN: left unwritten, or written as NaN"
                if np.isnan(value)
                else f"{value:g}: not finite"
                if np.isinf(value)
                else f"{value:g}, which does not fit in float32"
            )
            raise FeatureError(
                f"feature module {self._label}: output {self.outputs[column]!r} of record "
                f"{start + record} is {why}"
            )
        return features

    def _trap_message(self, exc: Exception, start: int, count: int) -> str:
        api = _wasmtime()
        where = f"feature module {self._label} on {_span(start, count)}"
        if isinstance(exc, api.Trap) and exc.trap_code == api.TrapCode.OUT_OF_FUEL:
            return (
                f"{where} ran out of fuel (raise [features] fuel_per_record, now "
                f"{self.limits.fuel_per_record:,}): {_one_line(exc)}"
            )
        failed = "trapped" if isinstance(exc, api.Trap) else "failed"
        return f"{where} {failed}: {_one_line(exc)}"


class _Runtime:
    """The process's one wasmtime engine, and the modules it compiled by sha256."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: int | None = None
        self._engine: wasmtime.Engine | None = None
        self._modules: OrderedDict[str, wasmtime.Module] = OrderedDict()

    def store(self, limits: FeatureLimits, *, fuel: int) -> wasmtime.Store:
        """A fresh store with ``limits``' memory cap, and ``fuel`` on top of its base."""
        with self._lock:
            store: wasmtime.Store = _wasmtime().Store(self._engine_here())
        tables = limits.memory_bytes // 8 // _MOST_TABLES  # 8 bytes a table element
        store.set_limits(limits.memory_bytes, tables, instances=1, tables=_MOST_TABLES, memories=1)
        store.set_fuel(limits.fuel_base + fuel)
        return store

    def compile(self, wasm: bytes, sha256: str, *, label: str) -> wasmtime.Module:
        """The compiled module of ``wasm`` (whose hash is ``sha256``), compiled once here."""
        api = _wasmtime()
        with self._lock:
            engine = self._engine_here()
            cached = self._modules.get(sha256)
            if cached is not None:
                self._modules.move_to_end(sha256)
                return cached
        try:
            compiled: wasmtime.Module = api.Module(engine, wasm)
        except api.WasmtimeError as exc:
            raise ConfigError(f"feature module {label} does not compile: {_one_line(exc)}") from exc
        self._keep(engine, sha256, compiled)
        return compiled

    def compile_isolated(
        self, wasm: bytes, sha256: str, limits: FeatureLimits, *, label: str
    ) -> None:
        """Compile ``wasm`` in a child process within ``limits`` (unless compiled already),
        and keep what it made as this process's compiled module."""
        with self._lock:
            engine = self._engine_here()
            if sha256 in self._modules:
                return
        artifact = compile_in_child(
            wasm,
            seconds=limits.compile_seconds,
            memory_bytes=limits.compile_memory_bytes,
            label=label,
        )
        api = _wasmtime()
        try:
            compiled: wasmtime.Module = api.Module.deserialize(engine, artifact)
        except api.WasmtimeError as exc:
            raise ConfigError(f"feature module {label}: {_one_line(exc)}") from exc
        self._keep(engine, sha256, compiled)

    def _keep(self, engine: wasmtime.Engine, sha256: str, compiled: wasmtime.Module) -> None:
        """Cache ``compiled`` (made by ``engine``, unless a fork replaced it meanwhile)."""
        with self._lock:
            if self._engine is engine:
                self._modules[sha256] = compiled
                while len(self._modules) > _CACHED_MODULES:
                    self._modules.popitem(last=False)

    def _engine_here(self) -> wasmtime.Engine:
        # a forked child makes its own: wasmtime does not promise an engine survives a fork
        if self._engine is None or self._process != os.getpid():
            engine: wasmtime.Engine = _wasmtime().Engine(engine_config())
            if self._engine is None:
                atexit.register(self.release)
            self._engine, self._process = engine, os.getpid()
            self._modules.clear()
        return self._engine

    def release(self) -> None:
        """Free the engine and the compiled modules now (at exit: once the interpreter tears
        wasmtime's module down, their finalizers could no longer free them, and say so)."""
        with self._lock:
            self._modules.clear()
            self._engine = None


def engine_config() -> wasmtime.Config:
    """The settings of every engine that runs feature modules (and of the child that compiles
    one from a peer: its compiled artifact loads only into an engine of the same settings)."""
    config: wasmtime.Config = _wasmtime().Config()
    config.consume_fuel = True
    config.cranelift_nan_canonicalization = True
    config.wasm_relaxed_simd_deterministic = True
    config.wasm_threads = False
    config.wasm_multi_memory = False  # one memory, under the cap
    config.wasm_gc = False  # a GC heap would sit outside the memory cap
    return config


_RUNTIME = _Runtime()


def _wasmtime() -> ModuleType:
    try:
        import wasmtime
    except ImportError as exc:
        raise MissingExtraError(
            extra="wasm", package="wasmtime", feature="portable feature modules"
        ) from exc
    return wasmtime


def _restore(wasm: bytes, limits: FeatureLimits) -> FeatureModule:
    return FeatureModule(wasm, limits=limits)


def _text_to_binary(text: bytes, path: Path) -> bytes:
    api = _wasmtime()
    try:
        return bytes(api.wat2wasm(text))
    except api.WasmtimeError as exc:
        raise ConfigError(
            f"feature module {str(path)!r} is not WebAssembly text: {_one_line(exc)}"
        ) from exc


def _check_interface(compiled: wasmtime.Module, label: str, limits: FeatureLimits) -> None:
    """Refuse a module with an import, or without the ABI's exports of the exact types."""
    api = _wasmtime()
    imports = compiled.imports
    if imports:
        first = imports[0]
        raise ConfigError(
            f"feature module {label} imports {first.module}.{first.name}: a feature module "
            f"may import nothing ({len(imports)} imports)"
        )
    exports = {export.name: export.type for export in compiled.exports}
    memory = exports.get("memory")
    if not isinstance(memory, api.MemoryType) or memory.is_64 or memory.is_shared:
        raise ConfigError(f"feature module {label} does not export a 32-bit memory 'memory'")
    if memory.limits.min * memory.page_size > limits.memory_bytes:
        raise ConfigError(
            f"feature module {label} starts with {memory.limits.min * memory.page_size:,} bytes "
            f"of memory, over its cap of {limits.memory_bytes:,} bytes ([features] memory_mb)"
        )
    for name, (params, results) in _SIGNATURES.items():
        function = exports.get(name)
        wanted = f"{name}({', '.join(params)}) -> {', '.join(results)}"
        if not isinstance(function, api.FuncType):
            raise ConfigError(f"feature module {label} does not export the function {wanted}")
        got_params, got_results = (
            [str(value) for value in values] for values in (function.params, function.results)
        )
        if (got_params, got_results) != (params, results):
            raise ConfigError(
                f"feature module {label} exports {name}({', '.join(got_params)}) -> "
                f"{', '.join(got_results) or 'nothing'}, not {wanted}"
            )


def _records_matrix(records: Any, inputs: Sequence[str], label: str) -> Records:
    """``records`` as a C-contiguous float64 array, a row a record, a column an input."""
    if not (isinstance(records, Mapping) or hasattr(records, "columns")):
        array = np.asarray(records)
        if array.ndim == 1 and array.size == 0:
            return np.empty((0, len(inputs)))
        if array.ndim != 2 or array.shape[1] != len(inputs):
            raise FeatureError(
                f"feature module {label} takes a 2-D array of {len(inputs)} columns or a "
                f"mapping of columns, not an array of shape {array.shape}"
            )
        return np.ascontiguousarray(_as_float64(array, inputs, label))
    available = list(records.keys() if isinstance(records, Mapping) else records.columns)
    present = set(available)
    missing = [name for name in inputs if name not in present]
    if missing:
        raise FeatureError(
            f"feature module {label} needs the column {missing[0]!r}, which the records lack "
            f"(they have {_names(available)})"
        )
    columns = [_as_float64(np.asarray(records[name]), (name,), label) for name in inputs]
    for name, column in zip(inputs, columns, strict=True):
        if column.ndim != 1 or len(column) != len(columns[0]):
            raise FeatureError(
                f"feature module {label}: column {name!r} has shape {column.shape}, not the "
                f"({len(columns[0])},) of column {inputs[0]!r}"
            )
    return np.column_stack(columns)


def _as_float64(values: npt.NDArray[Any], columns: Sequence[str], label: str) -> Records:
    """``values`` (a column, or a 2-D array of ``columns``) as float64, refusing what float64
    cannot hold exactly or at all."""
    holds = f"column {columns[0]!r} holds" if len(columns) == 1 else "the records hold"
    if values.dtype.kind not in "biufO":
        raise FeatureError(f"feature module {label}: {holds} {values.dtype} values, not numbers")
    if values.dtype.kind in "iuO" and values.size:
        inexact = _inexact_integers(values)
        if inexact.any():
            index = tuple(int(i) for i in np.argwhere(inexact)[0])
            raise FeatureError(
                f"feature module {label}: column {columns[index[-1] if values.ndim > 1 else 0]!r}"
                f" holds {values[index]} (record {index[0]}), over 2**53 in magnitude: not exact "
                "as float64"
            )
    try:
        return values.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise FeatureError(f"feature module {label}: {holds} values that are not numbers") from exc


def _inexact_integers(values: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    if values.dtype.kind == "O":
        flags = [
            isinstance(value, int | np.integer)
            and not isinstance(value, bool)
            and abs(int(value)) > _LARGEST_EXACT
            for value in values.flat
        ]
        return np.array(flags, dtype=bool).reshape(values.shape)
    return (values > _LARGEST_EXACT) | (values < -_LARGEST_EXACT)


def _as_i32(value: int) -> int:
    """An unsigned 32-bit address as the signed i32 that wasmtime passes."""
    return value - 2**32 if value >= 2**31 else value


def _span(start: int, count: int) -> str:
    return f"record {start}" if count == 1 else f"records {start} to {start + count - 1}"


def _names(names: Sequence[object]) -> str:
    shown = ", ".join(repr(name) for name in names[:_SHOWN_COLUMNS])
    more = len(names) - _SHOWN_COLUMNS
    return (shown + (f" and {more} more" if more > 0 else "")) or "no columns"


def _one_line(exc: Exception) -> str:
    """A wasmtime error in one line: its first line and root cause, without the backtrace."""
    head, _, cause = str(exc).strip().partition("Caused by:")
    causes = [re.sub(r"^\d+: ", "", line.strip()) for line in cause.splitlines() if line.strip()]
    first = (head.strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
    if not causes:
        return first
    return causes[-1] if "backtrace" in first else f"{first}: {causes[-1]}"
