"""Feature modules: exact features on the honest path, and every hostile module refused or
stopped, each with one line naming the module and the record."""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import multiprocessing
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

wasmtime = pytest.importorskip("wasmtime")

from shoal.core.errors import ConfigError, DataError, MissingExtraError  # noqa: E402
from shoal.features import (  # noqa: E402
    FeatureLimits,
    FeatureManifest,
    FeatureModule,
    with_manifest,
)

MEMORY = '(memory (export "memory") 1)'
BUMP_ALLOC = """
  (global $heap (mut i32) (i32.const 1024))
  (func (export "shoal_alloc") (param $bytes i32) (result i32)
    (local $ptr i32) (local $pages i32)
    (local.set $ptr (global.get $heap))
    (local.set $pages (i32.sub (i32.shr_u (i32.add (i32.add (local.get $ptr) (local.get $bytes))
      (i32.const 65535)) (i32.const 16)) (memory.size)))
    (if (i32.gt_s (local.get $pages) (i32.const 0))
      (then (if (i32.eq (memory.grow (local.get $pages)) (i32.const -1)) (then unreachable))))
    (global.set $heap (i32.add (local.get $ptr) (local.get $bytes)))
    (local.get $ptr))"""
LINEAR = """
    (f64.store (local.get $out) (f64.add (f64.mul (f64.const 2) (f64.load (local.get $in)))
      (f64.load offset=8 (local.get $in))))
    (f64.store offset=8 (local.get $out)
      (f64.mul (f64.load (local.get $in)) (f64.load offset=8 (local.get $in))))"""
LINEAR_COLUMNS = {"inputs": ("a", "b"), "outputs": ("twice_a_plus_b", "product")}
X = {"inputs": ("x",), "outputs": ("y",)}
COPY = "(f64.store (local.get $out) (f64.load (local.get $in)))"
SPIN = """(func (export "shoal_extract") (param i32 i32 i32) (result i32)
    (loop (br 0)) (i32.const 0))"""


def extract_loop(body: str, *, inputs: int, outputs: int, result: str = "(i32.const 0)") -> str:
    """``shoal_extract`` running ``body`` once a record, with ``$in`` and ``$out`` at the
    record's rows and ``$i`` its index in the batch."""
    return f"""
  (func (export "shoal_extract") (param $in i32) (param $out i32) (param $n i32) (result i32)
    (local $i i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      {body}
      (local.set $in (i32.add (local.get $in) (i32.const {8 * inputs})))
      (local.set $out (i32.add (local.get $out) (i32.const {8 * outputs})))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    {result})"""


def wat(
    body: str = COPY,
    *,
    inputs: Sequence[str] = ("x",),
    outputs: Sequence[str] = ("y",),
    alloc: str = BUMP_ALLOC,
    memory: str = MEMORY,
    extract: str | None = None,
    extra: str = "",
    manifest: bool = True,
) -> str:
    """A feature module's text: by default, a bump allocator and ``body`` run a record."""
    if extract is None:
        extract = extract_loop(body, inputs=len(inputs), outputs=len(outputs))
    document = {"abi": 1, "name": "demo", "version": "1.0", "inputs": inputs, "outputs": outputs}
    payload = json.dumps(document).replace('"', '\\"')
    section = f'(@custom "shoal.features" "{payload}")' if manifest else ""
    return f"(module {memory} {alloc} {extract} {extra} {section})"


def binary(body: str = COPY, **options: Any) -> bytes:
    return bytes(wasmtime.wat2wasm(wat(body, **options)))


def module(
    body: str = COPY, *, limits: FeatureLimits | None = None, **options: Any
) -> FeatureModule:
    return FeatureModule.from_bytes(binary(body, **options), limits=limits or FeatureLimits())


@functools.cache
def linear(batch_records: int = 4096) -> FeatureModule:
    return module(LINEAR, limits=FeatureLimits(batch_records=batch_records), **LINEAR_COLUMNS)


@functools.cache
def fused(batch_records: int) -> FeatureModule:
    body = """(f64.store (local.get $out) (f64.add
      (f64.mul (f64.load (local.get $in)) (f64.load offset=8 (local.get $in)))
      (f64.load offset=16 (local.get $in))))"""
    limits = FeatureLimits(batch_records=batch_records)
    return module(body, inputs=("x", "y", "z"), outputs=("fused",), limits=limits)


def bits(array: npt.NDArray[np.float32]) -> bytes:
    return array.tobytes()


class Frame:
    """A stand-in for a pandas DataFrame: ``columns`` and ``__getitem__``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self.columns = list(data)

    def __getitem__(self, name: str) -> Any:
        return self._data[name]


# -- the honest path -------------------------------------------------------------------------


def test_attributes() -> None:
    wasm = binary(LINEAR, **LINEAR_COLUMNS)
    features = FeatureModule.from_bytes(wasm)
    assert features.wasm == wasm
    assert features.sha256 == hashlib.sha256(wasm).hexdigest()
    assert (features.name, features.version) == ("demo", "1.0")
    assert features.inputs == ("a", "b")
    assert features.outputs == ("twice_a_plus_b", "product")
    assert features.manifest == FeatureManifest("demo", "1.0", ("a", "b"), features.outputs)
    assert features.limits == FeatureLimits()
    assert "demo" in repr(features)


def test_exact_features_from_a_2d_array() -> None:
    records = np.random.default_rng(1).normal(size=(1000, 2)) * 1e3
    expected = np.column_stack([2 * records[:, 0] + records[:, 1], records[:, 0] * records[:, 1]])
    features = linear().extract(records)
    assert features.dtype == np.float32
    assert features.shape == (1000, 2)
    assert bits(features) == bits(expected.astype(np.float32))
    assert bits(linear().extract(records.tolist())) == bits(features)


@pytest.mark.parametrize("make", [dict, Frame])
def test_exact_features_from_columns_by_name(make: Any) -> None:
    columns = make({"b": [2.0, 4.0, -1.5], "ignored": ["x", "y", "z"], "a": [1, 3, 0.25]})
    expected = np.array([[4.0, 2.0], [10.0, 12.0], [-1.0, -0.375]], dtype=np.float32)
    assert bits(linear().extract(columns)) == bits(expected)


def test_integer_and_bool_columns_are_converted() -> None:
    features = linear().extract({"a": np.array([2**53, -(2**53)]), "b": np.array([True, False])})
    assert features.tolist() == [[2.0**54 + 1, 2.0**53], [-(2.0**54), -0.0]]


@pytest.mark.parametrize("batch_records", [1, 3, 7, 4096])
def test_batches_give_identical_bits(batch_records: int) -> None:
    records = np.random.default_rng(2).normal(size=(50, 2))
    assert bits(linear(batch_records).extract(records)) == bits(linear(4096).extract(records))


@pytest.mark.parametrize(
    "records",
    [np.empty((0, 2)), [], {"a": [], "b": np.array([], dtype=np.int64)}, Frame({"a": [], "b": []})],
)
def test_no_records(records: Any) -> None:
    features = linear().extract(records)
    assert features.shape == (0, 2)
    assert features.dtype == np.float32


def test_no_records_runs_nothing() -> None:
    spinning = module(extract=SPIN)
    assert spinning.extract(np.empty((0, 1))).shape == (0, 1)


def test_nan_inputs_reach_the_module() -> None:
    body = """(f64.store (local.get $out) (f64.convert_i32_u
      (f64.ne (f64.load (local.get $in)) (f64.load (local.get $in)))))"""
    features = module(body, outputs=("missing",)).extract([[1.0], [np.nan], [-np.inf], [0.0]])
    assert features.ravel().tolist() == [0.0, 1.0, 0.0, 0.0]


@given(
    st.lists(
        st.tuples(*[st.floats(-1e18, 1e18, allow_subnormal=True)] * 3), min_size=1, max_size=40
    ),
    st.sampled_from([1, 5, 4096]),
)
@settings(max_examples=150, deadline=None)
def test_module_f64_agrees_with_numpy(rows: list[tuple[float, float, float]], batch: int) -> None:
    records = np.array(rows, dtype=np.float64)
    expected = (records[:, 0] * records[:, 1] + records[:, 2]).astype(np.float32)
    assert bits(fused(batch).extract(records).ravel()) == bits(expected)


def test_pickles_by_value() -> None:
    features = linear(3)
    restored = pickle.loads(pickle.dumps(features))
    assert restored == features
    assert restored.wasm == features.wasm
    assert restored.limits == features.limits
    records = np.random.default_rng(3).normal(size=(10, 2))
    assert bits(restored.extract(records)) == bits(features.extract(records))


def test_runs_in_a_spawned_process_pool() -> None:
    features = linear(16)
    chunks = np.array_split(np.random.default_rng(4).normal(size=(400, 2)), 4)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        results = list(pool.map(features.extract, chunks))
    assert bits(np.concatenate(results)) == bits(features.extract(np.concatenate(chunks)))


def test_load_text_and_binary(tmp_path: Path) -> None:
    text = tmp_path / "demo.wat"
    text.write_text(wat(LINEAR, **LINEAR_COLUMNS))
    compiled = tmp_path / "demo.wasm"
    compiled.write_bytes(binary(LINEAR, **LINEAR_COLUMNS))
    assert FeatureModule.load(text) == FeatureModule.load(str(compiled)) == linear()


def test_load_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        FeatureModule.load(tmp_path / "missing.wasm")
    broken = tmp_path / "broken.wat"
    broken.write_text("(module (func (oops)))")
    with pytest.raises(ConfigError, match="is not WebAssembly text"):
        FeatureModule.load(broken)


def test_with_manifest_makes_a_module_loadable() -> None:
    bare = binary(LINEAR, manifest=False, **LINEAR_COLUMNS)
    with pytest.raises(ConfigError, match=r"no 'shoal\.features' custom section"):
        FeatureModule.from_bytes(bare)
    manifest = FeatureManifest("demo", "1.0", ("a", "b"), ("twice_a_plus_b", "product"))
    features = FeatureModule.from_bytes(with_manifest(bare, manifest))
    assert features.extract([[1, 2]]).tolist() == [[4.0, 2.0]]


def test_a_module_can_name_a_record_it_cannot_compute_across_batches() -> None:
    body = (
        """(if (f64.lt (f64.load (local.get $in)) (f64.const 0))
      (then (return (i32.add (local.get $i) (i32.const 1)))))"""
        + COPY
    )
    records = np.arange(10.0).reshape(-1, 1)
    records[6] = -1
    with pytest.raises(DataError, match=r"'demo' 1.0 cannot compute record 6$"):
        module(body, limits=FeatureLimits(batch_records=4)).extract(records)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (4, r"cannot compute record 3$"),
        (5, r"failed with code 5 on records 0 to 3$"),
        (1000, r"failed with code 1000 on records 0 to 3$"),
        (-1, r"failed with code -1 on records 0 to 3$"),
        (2**31 - 1, r"failed with code 2147483647 on records 0 to 3$"),
    ],
)
def test_a_failure_code(code: int, message: str) -> None:
    extract = extract_loop(COPY, inputs=1, outputs=1, result=f"(i32.const {code})")
    with pytest.raises(DataError, match=message):
        module(extract=extract, limits=FeatureLimits(batch_records=4)).extract(np.zeros((10, 1)))


def test_a_stateful_module_sees_a_fresh_instance_every_batch() -> None:
    extra = "(global $seen (mut f64) (f64.const 0))"
    body = """(global.set $seen (f64.add (global.get $seen) (f64.const 1)))
      (f64.store (i32.const 0) (f64.add (f64.load (i32.const 0)) (f64.const 1)))
      (f64.store (local.get $out) (f64.add (global.get $seen) (f64.load (i32.const 0))))"""
    features = module(body, extra=extra, limits=FeatureLimits(batch_records=3))
    first = features.extract(np.zeros((7, 1)))
    assert first.ravel().tolist() == [2, 4, 6, 2, 4, 6, 2]
    assert bits(features.extract(np.zeros((7, 1)))) == bits(first)


# -- hostile modules: refused at construction ------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (
            '(import "wasi_snapshot_preview1" "fd_write" '
            "(func (param i32 i32 i32 i32) (result i32)))",
            "wasi_snapshot_preview1.fd_write",
        ),
        ('(import "env" "now" (func (result f64)))', "env.now"),
        ('(import "env" "seed" (global i64))', "env.seed"),
    ],
)
def test_refuses_imports(extra: str, named: str) -> None:
    with pytest.raises(ConfigError, match=rf"'demo' 1.0 imports {named}: .* may import nothing"):
        FeatureModule.from_bytes(
            bytes(wasmtime.wat2wasm(wat().replace("(module", f"(module {extra}", 1)))
        )


def test_refuses_an_imported_memory() -> None:
    memory = '(import "env" "memory" (memory 1)) (export "memory" (memory 0))'
    with pytest.raises(ConfigError, match=r"imports env\.memory"):
        module(memory=memory)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"memory": "(memory 1)"}, "does not export a 32-bit memory 'memory'"),
        ({"memory": '(memory (export "heap") 1)'}, "does not export a 32-bit memory 'memory'"),
        (
            {"memory": '(memory 1) (func (export "memory"))'},
            "does not export a 32-bit memory 'memory'",
        ),
        (
            {
                "memory": '(memory (export "memory") i64 1)',
                "alloc": '(func (export "shoal_alloc") (param i32) (result i32) (i32.const 8))',
                "extract": SPIN,
            },
            "does not export a 32-bit memory 'memory'",
        ),
        ({"alloc": ""}, r"does not export the function shoal_alloc\(i32\) -> i32"),
        ({"extract": ""}, r"does not export the function shoal_extract\(i32, i32, i32\) -> i32"),
        (
            {"alloc": '(func (export "shoal_alloc") (param i64) (result i32) (i32.const 8))'},
            r"exports shoal_alloc\(i64\) -> i32, not shoal_alloc\(i32\) -> i32",
        ),
        (
            {"alloc": '(global (export "shoal_alloc") i32 (i32.const 8))'},
            r"does not export the function shoal_alloc",
        ),
        (
            {
                "extract": '(func (export "shoal_extract") (param i32 i32 i32))',
            },
            r"exports shoal_extract\(i32, i32, i32\) -> nothing",
        ),
        (
            {
                "extract": '(func (export "shoal_extract") (param i32 i32) (result i32) '
                "(i32.const 0))",
            },
            r"exports shoal_extract\(i32, i32\) -> i32",
        ),
        (
            {"memory": '(memory (export "memory") 2000)'},
            r"starts with 131,072,000 bytes of memory, over its cap of 67,108,864 bytes",
        ),
    ],
)
def test_refuses_a_bad_interface(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        module(**options)
    assert "'demo' 1.0" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_refuses_a_module_over_the_size_limit(tmp_path: Path) -> None:
    wasm = binary()
    limits = FeatureLimits(max_module_bytes=len(wasm) - 1)
    with pytest.raises(ConfigError, match=r"over the limit on a module.s size"):
        FeatureModule.from_bytes(wasm, limits=limits)
    path = tmp_path / "big.wasm"
    path.write_bytes(wasm)
    with pytest.raises(ConfigError, match=r"over the limit on a module.s size"):
        FeatureModule.load(path, limits=limits)
    assert FeatureModule.from_bytes(wasm, limits=FeatureLimits(max_module_bytes=len(wasm)))


def test_refuses_a_module_that_does_not_compile() -> None:
    manifest = FeatureManifest("demo", "1.0", ("x",), ("y",))
    garbage = with_manifest(b"\0asm\x01\0\0\0\x01\x05garba", manifest)
    with pytest.raises(
        ConfigError, match=r"feature module 'demo' 1.0 does not compile: "
    ) as caught:
        FeatureModule.from_bytes(garbage)
    assert "\n" not in str(caught.value)


def test_refuses_a_second_memory() -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        module(memory=MEMORY + " (memory 1)")


def test_wasmtime_is_an_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wasmtime", None)
    with pytest.raises(MissingExtraError, match=r"shoal\[wasm\]") as caught:
        module(limits=FeatureLimits(max_module_bytes=10**6))
    assert caught.value.extra == "wasm"


@pytest.mark.parametrize(
    "changes",
    [
        {"fuel_per_record": 0},
        {"fuel_base": -1},
        {"memory_bytes": 1.5},
        {"batch_records": True},
        {"max_module_bytes": "16"},
        {"memory_bytes": 2**32 + 1},
        {"fuel_base": 2**64 - 1},
    ],
)
def test_limits_are_checked(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"feature limit|feature limits|memory cap"):
        FeatureLimits(**changes)


# -- hostile modules and records: stopped while extracting -----------------------------------


def test_an_endless_loop_runs_out_of_fuel() -> None:
    features = module(extract=SPIN, limits=FeatureLimits(batch_records=4, fuel_base=1000))
    with pytest.raises(DataError) as caught:
        features.extract(np.zeros((10, 1)))
    message = str(caught.value)
    assert message.startswith("feature module 'demo' 1.0 on records 0 to 3 ran out of fuel")
    assert "raise [features] fuel_per_record" in message
    assert "fuel" in message.rsplit(":", 1)[-1]
    assert "\n" not in message
    assert isinstance(caught.value.__cause__, wasmtime.Trap)


def test_a_start_function_runs_within_the_fuel() -> None:
    extra = "(func $spin (loop (br 0))) (start $spin)"
    with pytest.raises(DataError, match=r"record 0 ran out of fuel"):
        module(extra=extra).extract([[1.0]])


def test_fuel_is_budgeted_a_record() -> None:
    body = (
        """(block $stop (loop $spin
        (br_if $stop (f64.ge (f64.load (local.get $in)) (f64.const 0)))
        (f64.store (local.get $in) (f64.add (f64.load (local.get $in)) (f64.const 1)))
        (br $spin)))"""
        + COPY
    )
    limits = FeatureLimits(fuel_per_record=1000, fuel_base=1000, batch_records=2)
    features = module(body, limits=limits)
    assert features.extract([[-5.0], [-3.0]]).ravel().tolist() == [0.0, 0.0]
    with pytest.raises(DataError, match=r"records 2 to 3 ran out of fuel"):
        features.extract([[-5.0], [-3.0], [-1e6], [0.0]])


@pytest.mark.parametrize(("memory_bytes", "pages"), [(4 * 2**20, 64), (64 * 2**20, 1024)])
def test_memory_growth_stops_at_the_cap(memory_bytes: int, pages: int) -> None:
    extract = """(func (export "shoal_extract") (param i32 i32 i32) (result i32)
      (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
      (memory.size))"""
    features = module(extract=extract, limits=FeatureLimits(memory_bytes=memory_bytes))
    with pytest.raises(DataError, match=rf"failed with code {pages} on record 0$"):
        features.extract([[1.0]])


def test_a_memory_bomb_is_refused() -> None:
    extract = """(func (export "shoal_extract") (param i32 i32 i32) (result i32)
      (if (i32.eq (memory.grow (i32.const 65535)) (i32.const -1)) (then unreachable))
      (i32.const 0))"""
    with pytest.raises(DataError, match=r"record 0 trapped: .*unreachable"):
        module(extract=extract).extract([[1.0]])


def test_a_batch_larger_than_the_memory_cap_is_stopped() -> None:
    features = FeatureModule.from_bytes(linear().wasm, limits=FeatureLimits(memory_bytes=2**16))
    with pytest.raises(DataError, match=r"records 0 to 4095 trapped: .*unreachable"):
        features.extract(np.zeros((5000, 2)))


@pytest.mark.parametrize(
    ("pointer", "message"),
    [
        (1028, r"returned 0x404 for record 0, which is not 8-byte aligned"),
        (65536 - 8, r"returned 0xfff8 for 16 bytes \(record 0\), past the end of its 65,536"),
        (65536, r"returned 0x10000 .* past the end"),
        (-8, r"returned 0xfffffff8 .* past the end"),
    ],
)
def test_refuses_a_bad_allocation(pointer: int, message: str) -> None:
    alloc = f'(func (export "shoal_alloc") (param i32) (result i32) (i32.const {pointer}))'
    with pytest.raises(DataError, match=message):
        module(alloc=alloc).extract([[1.0]])


def test_a_trap_is_named() -> None:
    with pytest.raises(DataError) as caught:
        module("unreachable", limits=FeatureLimits(batch_records=2)).extract(np.zeros((3, 1)))
    assert str(caught.value) == (
        "feature module 'demo' 1.0 on records 0 to 1 trapped: "
        "wasm trap: wasm `unreachable` instruction executed"
    )
    assert isinstance(caught.value.__cause__, wasmtime.Trap)


def test_an_out_of_bounds_access_is_named() -> None:
    body = "(f64.store (i32.const -16) (f64.const 1))"
    with pytest.raises(DataError, match=r"record 0 trapped: .*out of bounds memory access$"):
        module(body).extract([[1.0]])


def test_a_module_that_writes_nothing_is_refused() -> None:
    with pytest.raises(DataError, match=r"output 'y' of record 0 is NaN: left unwritten"):
        module("").extract([[1.0]])


def test_a_module_that_skips_one_output_is_refused() -> None:
    body = """(if (f64.ne (f64.load (local.get $in)) (f64.const 7)) (then """ + COPY + "))"
    with pytest.raises(DataError, match=r"output 'y' of record 5 is NaN"):
        module(body, limits=FeatureLimits(batch_records=2)).extract([[1], [2], [3], [4], [5], [7]])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("inf", r"inf: not finite"),
        ("-inf", r"-inf: not finite"),
        ("nan", r"NaN"),
        ("1e300", r"1e\+300, which does not fit in float32"),
        ("-3.5e38", r"-3.5e\+38, which does not fit in float32"),
    ],
)
def test_refuses_an_output_float32_cannot_hold(value: str, message: str) -> None:
    body = f"(f64.store (local.get $out) (f64.const {value}))"
    with pytest.raises(DataError, match=rf"output 'y' of record 0 is {message}"):
        module(body).extract([[1.0]])


def test_the_largest_float32_is_kept() -> None:
    largest = float(np.finfo(np.float32).max)
    body = f"(f64.store (local.get $out) (f64.const {largest!r}))"
    assert module(body).extract([[1.0]]).tolist() == [[largest]]


@pytest.mark.parametrize(
    "column",
    [
        np.array([0, 2**53 + 1]),
        np.array([0, -(2**53) - 1]),
        np.array([0, 2**64 - 1], dtype=np.uint64),
        np.array([0, 2**70], dtype=object),
    ],
)
def test_refuses_integers_float64_cannot_hold(column: Any) -> None:
    message = r"column 'b' holds -?\d+ \(record 1\), over 2\*\*53"
    with pytest.raises(DataError, match=message):
        linear().extract({"a": [1, 2], "b": column})
    with pytest.raises(DataError, match=message):
        linear().extract(np.column_stack([np.array([1, 2], dtype=column.dtype), column]))


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            {"a": [1.0], "c": [2.0]},
            r"needs the column 'b', which the records lack \(they have 'a', 'c'\)",
        ),
        (Frame({"x": [1.0]}), r"needs the column 'a', .* \(they have 'x'\)"),
        ({}, r"needs the column 'a', .* \(they have no columns\)"),
        ({"a": [1.0, 2.0], "b": [1.0]}, r"column 'b' has shape \(1,\), not the \(2,\)"),
        ({"a": [[1.0]], "b": [[1.0]]}, r"column 'a' has shape \(1, 1\)"),
        ({"a": ["x"], "b": [1.0]}, r"column 'a' holds <U1 values, not numbers"),
        ({"a": [1.0], "b": [1j]}, r"column 'b' holds complex128 values"),
        ({"a": [object()], "b": [1.0]}, r"column 'a' holds values that are not numbers"),
        (np.zeros((3, 3)), r"takes a 2-D array of 2 columns .* not an array of shape \(3, 3\)"),
        (np.zeros(2), r"shape \(2,\)"),
        (np.zeros((1, 2, 2)), r"shape \(1, 2, 2\)"),
        (np.array([["1", "2"]]), r"the records hold <U1 values"),
    ],
)
def test_refuses_bad_records(records: Any, message: str) -> None:
    with pytest.raises(DataError, match=message):
        linear().extract(records)


def test_lists_many_columns_briefly() -> None:
    columns = {f"c{i}": [1.0] for i in range(30)}
    with pytest.raises(DataError, match=r"'c19' and 10 more\)$"):
        linear().extract(columns)
