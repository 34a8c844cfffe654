"""Folders Shoal writes into: made when missing and proven writable, or one clear error.

A run folder, a coordinator's state folder, a client's enrollment folder:
each is checked once, before anything is written, so that a path under a
file, a folder without write permission or a read-only file system is one
:class:`~shoal.core.errors.RunError` naming the folder, not a traceback from
deep inside a write.

A folder one process alone may use (a run's) is held with :func:`hold_folder`:
an exclusive, non-blocking ``flock`` on its ``.shoal.lock``, which the OS
releases when the process ends, however it ends (``kill -9`` leaves no stale
hold). A second process is refused in one line that names the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from shoal.core.errors import RunError

LOCK_FILE = ".shoal.lock"  # what a folder is held by (hold_folder)


def writable_folder(path: str | Path, *, what: str) -> Path:
    """``path`` as a folder Shoal can write in, created with its parents when missing.

    ``what`` names it in the error (``run folder``, ``coordinator.state_dir``).

    >>> writable_folder("/proc/shoal", what="run folder")  # doctest: +SKIP
    RunError: run folder /proc/shoal cannot be written: No such file or directory
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass  # mkdir succeeds on an existing read-only folder: a write proves it
    except OSError as exc:
        raise RunError(f"{what} {folder} cannot be written: {exc.strerror or exc}") from exc
    return folder


class FolderHold:
    """This process's exclusive hold on a folder, until :meth:`release`, until the hold is
    collected, or until the process ends."""

    def __init__(self, folder: Path, descriptor: int) -> None:
        self.folder = folder
        # closing the descriptor releases the flock
        self._closer = weakref.finalize(self, os.close, descriptor)

    @property
    def held(self) -> bool:
        return self._closer.alive

    def release(self) -> None:
        """Let another process hold the folder; releasing twice is a no-op. The lock file
        stays: removing it would let a process that opened it before hold a lock nobody sees."""
        self._closer()

    def __enter__(self) -> FolderHold:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def hold_folder(path: str | Path, *, what: str) -> FolderHold:
    """Hold ``path`` (made and proven writable first) for this process alone.

    A folder another process holds is one :class:`RunError` naming it and, when
    the lock file says, the holder's pid. ``what`` names the folder, as in
    :func:`writable_folder`.

    >>> with hold_folder("runs/a", what="run folder"):  # doctest: +SKIP
    ...     hold_folder("runs/a", what="run folder")
    RunError: run folder runs/a is in use by another shoal process (pid 4242): ...
    """
    folder = writable_folder(path, what=what)
    lock_path = folder / LOCK_FILE
    descriptor = lock_exclusively(
        lock_path,
        what=f"{what} {folder}",
        in_use=lambda: (
            f"{what} {folder} is in use by another shoal process{_holder(lock_path)}: "
            "wait for it to end, or use another folder"
        ),
    )
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())  # who holds it, for the refused
    return FolderHold(folder, descriptor)


def lock_exclusively(lock_path: Path, *, what: str, in_use: Callable[[], str]) -> int:
    """A descriptor of ``lock_path`` (made when missing) under this process's exclusive,
    non-blocking ``flock``, which the OS lets go when the descriptor closes or the process
    ends. Held by another process: one :class:`RunError` of ``in_use()``; a file that cannot
    be opened or locked: one naming ``what``."""
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise RunError(f"{what} cannot be locked: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(descriptor)
        if isinstance(exc, BlockingIOError):
            raise RunError(in_use()) from None
        raise RunError(f"{what} cannot be locked: {exc.strerror or exc}") from exc
    return descriptor


def _holder(lock_path: Path) -> str:
    """`` (pid N)`` from the lock file, or nothing when it cannot be read (yet)."""
    try:
        pid = lock_path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
