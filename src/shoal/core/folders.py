"""Folders Shoal writes into: made when missing and proven writable, or one clear error.

A run folder, a coordinator's state folder, a client's enrollment folder:
each is checked once, before anything is written, so that a path under a
file, a folder without write permission or a read-only file system is one
:class:`~shoal.core.errors.RunError` naming the folder, not a traceback from
deep inside a write.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from shoal.core.errors import RunError


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
