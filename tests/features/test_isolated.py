"""Compiling a feature module from a peer in a child process: within its time and memory,
the same module as one compiled here; past them, one line naming the limit; and a deployed
client checks a module's sha256 before it compiles a byte of it.

The hostile module is a compile bomb: one function whose loop nests thousands of branches,
each assigning some of thousands of locals. Cranelift's time and memory grow faster than its
size: 90 kB of it takes seconds and most of a gigabyte to compile (a 257 kB one, minutes and
ten gigabytes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shoal.client.features import FeatureSource
from shoal.core.errors import ConfigError, SecurityError
from shoal.features import FeatureLimits, FeatureManifest, FeatureModule, with_manifest

wasmtime = pytest.importorskip("wasmtime")

MANIFEST = FeatureManifest(name="t", version="1", inputs=("x",), outputs=("y",))
ALLOC = '(func (export "shoal_alloc") (param i32) (result i32) i32.const 1024)'
DOUBLE = """(func (export "shoal_extract") (param $in i32) (param $out i32) (param $n i32)
    (result i32) (local $i i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (f64.store (i32.add (local.get $out) (i32.shl (local.get $i) (i32.const 3)))
        (f64.mul (f64.const 2)
          (f64.load (i32.add (local.get $in) (i32.shl (local.get $i) (i32.const 3))))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    i32.const 0)"""


def module_bytes(*functions: str) -> bytes:
    text = f'(module (memory (export "memory") 1) {ALLOC} {" ".join(functions)})'
    return with_manifest(bytes(wasmtime.wat2wasm(text)), MANIFEST)


def compile_bomb(*, locals_: int = 4000, branches: int = 4000) -> bytes:
    """A valid feature module whose one extra function costs Cranelift seconds and hundreds of
    megabytes to compile (``shoal_extract`` itself is honest)."""
    body = []
    for branch in range(branches):
        targets = [(branch * 3 + k) % locals_ for k in range(3)]
        sets = " ".join(f"(local.set {j} (local.get {(j * 31 + 7) % locals_}))" for j in targets)
        body.append(f"(if (local.get 0) (then {sets}")
    nested = " ".join(body) + ")" * (2 * branches)
    declared = " ".join(["i32"] * locals_)
    bomb = f"(func (param i32) (local {declared}) (loop {nested} (br_if 0 (local.get 0))))"
    return module_bytes(DOUBLE, bomb)


def test_a_module_compiled_in_a_child_computes_what_one_compiled_here_does() -> None:
    data = module_bytes(DOUBLE)
    here = FeatureModule.from_bytes(data)
    isolated = FeatureModule.from_bytes(data, isolated=True)
    records = np.array([[1.5], [-3.0], [0.0]])
    assert np.array_equal(isolated.extract(records), here.extract(records))
    assert isolated.sha256 == here.sha256


def test_a_module_that_is_not_webassembly_is_one_line() -> None:
    # a function body in the code section, and no function declared for it
    data = with_manifest(b"\0asm\x01\0\0\0\x0a\x04\x01\x02\x00\x0b", MANIFEST)
    with pytest.raises(ConfigError, match="does not compile"):
        FeatureModule.from_bytes(data, isolated=True)


def test_a_compile_bomb_is_stopped_at_its_time_limit() -> None:
    limits = FeatureLimits(compile_seconds=1)
    with pytest.raises(ConfigError, match=r"did not compile within 1 s .*compile_seconds"):
        FeatureModule.from_bytes(compile_bomb(), limits=limits, isolated=True)


def test_a_compile_bomb_is_stopped_at_its_memory_limit() -> None:
    """At the least memory the config allows, an honest module compiles; the bomb does not."""
    limits = FeatureLimits(compile_seconds=60, compile_memory_bytes=512 * 2**20)
    honest = module_bytes(DOUBLE, "(func)")  # a module of its own: not compiled here before
    FeatureModule.from_bytes(honest, limits=limits, isolated=True)
    with pytest.raises(ConfigError, match=r"512 MiB .*compile_memory_mb.*compiler stopped"):
        FeatureModule.from_bytes(compile_bomb(), limits=limits, isolated=True)


def test_a_compiler_that_cannot_start_is_not_the_modules_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No wasmtime where the child looks (an install without the extra): an OSError saying
    so, which a deployed client reports as a refused task and goes on."""
    monkeypatch.setattr("sys.path", ["/nonexistent"])
    with pytest.raises(OSError, match="could not start"):
        FeatureModule.from_bytes(module_bytes(DOUBLE, "(func) (func)"), isolated=True)


def test_the_compiler_ignores_the_folder_and_environment_it_is_started_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``resource.py`` in the current folder, or ``PYTHONPATH``, would otherwise be what the
    child imports to set its own limits."""
    (tmp_path / "resource.py").write_text("raise SystemExit(9)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    module = FeatureModule.from_bytes(module_bytes(DOUBLE, "(func) (func) (func)"), isolated=True)
    assert module.extract(np.array([[2.0]]))[0, 0] == 4.0


def test_a_client_checks_the_sha256_before_it_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A download that is not the module its task names (or sent where the task names none)
    is refused by its hash, and a module that is not the pinned one is refused before it is
    downloaded: a bomb is never handed to the compiler."""
    compiled: list[bytes] = []
    monkeypatch.setattr(
        FeatureModule, "from_bytes", classmethod(lambda cls, data, **_: compiled.append(data))
    )
    bomb = compile_bomb(locals_=10, branches=10)
    source = FeatureSource(lambda module: None)  # type: ignore[arg-type,return-value]
    for expected in (None, "cd" * 32):
        with pytest.raises(SecurityError, match="the task names"):
            source.module(bomb, expected=expected)
    pinned = FeatureSource(lambda module: None, pinned="ab" * 32)  # type: ignore[arg-type,return-value]
    assert pinned.refuses("cd" * 32) is not None and pinned.refuses(None) is not None
    assert pinned.refuses("ab" * 32) is None
    assert compiled == []
