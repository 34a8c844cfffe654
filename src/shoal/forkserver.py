"""The process server a simulation's workers fork from, started as early as ``shoal simulate`` can.

A simulation's pool (:class:`shoal.simulation.executor.ProcessExecutor`)
forks its workers from multiprocessing's forkserver with NumPy and Shoal
imported (:data:`PRELOAD`), so that each worker starts at once and is safe
beside threads. That server's own imports take a second or more. Started
when the pool is made, they come after the command's imports of the very
same modules, one after the other; started by :func:`start_early` as the
command line begins, they run on another core beside the command's own,
and a run reaches its first round about a second sooner.

This module imports nothing of Shoal's: the command line reads it before
its own imports. The decision to start is a guess from the command line and
the config file, and only a guess: a wrong one costs an idle server, or
leaves the pool to start the server itself, as it always could.

>>> wants_pool(["simulate", "--set", "simulation.workers=0"])
False
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PRELOAD = ("numpy", "shoal.simulation.executor", "shoal.apps.builtin")
"""The modules the forkserver imports before it forks the first worker."""

VALUE_OPTIONS = frozenset(
    {"--rounds", "-r", "--seed", "-s", "--out", "-o", "--resume", "--set", "--log-level"}
)
"""``shoal simulate``'s options that take a value (a test holds them to the command's)."""

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")  # as shoal.config's
PEEK_BYTES = 1 << 20
"""A config file longer than this is not read ahead (the command reads it as always)."""


def forkserver_context() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its preload set to :data:`PRELOAD`."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


def start_early(argv: Sequence[str]) -> bool:
    """Start the forkserver now when ``argv`` (the program's, its name first) runs a simulation
    that will want a process pool; whether it started one."""
    if not argv or not _is_shoal(argv[0]) or _in_a_worker():
        return False
    if not wants_pool(list(argv[1:])):
        return False
    forkserver_context()
    from multiprocessing import forkserver

    try:
        forkserver.ensure_running()  # returns as the server starts: its imports run beside ours
    except (OSError, RuntimeError):
        return False  # the pool starts it itself, as it always could
    return True


def _in_a_worker() -> bool:
    """Whether this process is a pool's worker, which runs the command's script again as
    ``__mp_main__`` (with the command's ``sys.argv``) before its work: it starts nothing.
    (Importing multiprocessing names ``__main__`` ``__mp_main__`` too; a worker's is the
    script being run, another module.)"""
    if multiprocessing.parent_process() is not None:
        return True
    return sys.modules.get("__mp_main__", sys.modules.get("__main__")) is not sys.modules.get(
        "__main__"
    )


def _is_shoal(program: str) -> bool:
    """Whether ``program`` (``sys.argv[0]``) is the ``shoal`` command or ``python -m shoal``,
    not another program that imports the command line's package."""
    path = Path(program)
    return path.name == "shoal" or (path.name == "__main__.py" and path.parent.name == "shoal")


def wants_pool(words: Sequence[str]) -> bool:
    """Whether the command ``words`` is ``simulate`` with a config whose ``[simulation]`` takes
    a local pool (two workers or more). Any doubt (a ``--resume``, an override of the
    simulation's settings, a file that does not read) answers no, and so does ``--help``."""
    if not words or words[0] != "simulate" or {"--help", "-h"} & set(words):
        return False
    config: Path | None = None
    rest = iter(words[1:])
    for word in rest:
        name = word.split("=", 1)[0]
        if name in VALUE_OPTIONS:
            value = word.split("=", 1)[1] if "=" in word else next(rest, "")
            if name == "--resume" or value.startswith("simulation."):
                return False
        elif word.startswith("-"):
            continue  # a flag
        elif config is None:
            config = Path(word)
    try:  # a guess never raises: the command reads the file again and says what is wrong
        with (DEFAULT_CONFIG if config is None else config).open("rb") as stream:
            text = stream.read(PEEK_BYTES + 1)
        if len(text) > PEEK_BYTES:
            return False
        section: Any = tomllib.loads(text.decode("utf-8")).get("simulation", {})
    except (OSError, ValueError, RecursionError, MemoryError):  # unreadable, not UTF-8, not TOML
        return False
    if not isinstance(section, dict):
        return False
    workers, backend = section.get("workers", 2), section.get("backend", "local")
    return isinstance(workers, int) and workers >= 2 and backend == "local"
