"""Compiling a feature module from a peer in a child process, within a time and memory limit.

A module's fuel and memory cap bound what it does once it runs, not what compiling it
costs: Cranelift's time and memory grow faster than a function's size, and a 257 kB module
of nested branches over many locals takes minutes and gigabytes to compile. A deployed client
compiles a module that came over the network this way: a fresh Python process, its address
space and CPU time capped (``RLIMIT_AS``, ``RLIMIT_CPU``) and its wall time bounded, compiles
it with the very engine settings of this process and writes wasmtime's compiled artifact to
its standard output; this process loads the artifact and caches it like a module it compiled
itself. The child bounds what the compiler spends; it is no privilege boundary: the artifact
is trusted as the compiler's own output would be here. Whatever stops the child is one
:class:`~shoal.core.errors.ConfigError` naming the limit; a child that cannot start (no
wasmtime, no memory even to import it) is an ``OSError`` saying so.

The child runs :func:`main` in isolated mode (``-I``), in an empty folder with an empty
environment, on this process's import path, with the module on standard input.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from shoal.core.errors import ConfigError

_EXIT_REFUSED = 3  # the child compiled nothing: the module is not WebAssembly it takes
_EXIT_BROKEN = 4  # the child could not import what it compiles with
_BOOT = f"""import json, sys
sys.path[:] = json.loads(sys.argv[1])
try:
    from shoal.features.isolated import main
except ImportError as exc:
    sys.stderr.write(f"ImportError: {{exc}}\\n")
    raise SystemExit({_EXIT_BROKEN})
raise SystemExit(main(sys.argv[2:]))
"""


def compile_in_child(wasm: bytes, *, seconds: int, memory_bytes: int, label: str) -> bytes:
    """wasmtime's compiled artifact of ``wasm``, made in a child process that may use at most
    ``seconds`` of time and ``memory_bytes`` of address space."""
    # isolated mode (-I: no environment variables, no user site, not the current directory on
    # its path) in an empty folder with an empty environment: what it imports is this
    # process's own modules, from the folders this process imports them from
    command = [sys.executable, "-I", "-c", _BOOT, json.dumps(sys.path), str(seconds)]
    command.append(str(memory_bytes))
    try:
        with tempfile.TemporaryDirectory(prefix="shoal-compile-") as folder:
            done = subprocess.run(
                command,
                input=wasm,
                capture_output=True,
                timeout=seconds + 5,  # its CPU limit stops it first; this, a child that sleeps
                check=False,
                cwd=folder,
                env={"PYTHONDONTWRITEBYTECODE": "1"},
            )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"feature module {label} did not compile within {seconds} s "
            "([features] compile_seconds)"
        ) from None
    if done.returncode == 0 and done.stdout:
        return done.stdout
    reason = done.stderr.decode(errors="replace").strip().splitlines()
    last = reason[-1] if reason else ""
    if done.returncode == _EXIT_REFUSED:
        raise ConfigError(f"feature module {label} does not compile: {last}")
    if done.returncode == _EXIT_BROKEN:  # not the module's doing: say what stopped the child
        raise OSError(f"the feature module compiler could not start: {last}")
    raise ConfigError(
        f"feature module {label} did not compile within {seconds} s and "
        f"{memory_bytes // 2**20} MiB ([features] compile_seconds, compile_memory_mb): "
        f"the compiler stopped ({_why(done.returncode)})"
    )


def _why(returncode: int) -> str:
    if returncode < 0:
        return f"signal {-returncode}"
    return f"exit status {returncode}"


def main(argv: list[str]) -> int:
    """The child: compile the module on standard input within the limits ``argv`` gives."""
    import resource

    seconds, memory_bytes = int(argv[0]), int(argv[1])
    # set here, not by the parent between fork and exec (unsafe beside its threads)
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    try:
        import wasmtime

        from shoal.features.module import engine_config
    except (ImportError, MemoryError, OSError) as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return _EXIT_BROKEN

    wasm = sys.stdin.buffer.read()
    try:
        module = wasmtime.Module(wasmtime.Engine(engine_config()), wasm)
    except wasmtime.WasmtimeError as exc:
        sys.stderr.write(" ".join(str(exc).split())[:400] + "\n")
        return _EXIT_REFUSED
    sys.stdout.buffer.write(module.serialize())
    return 0
