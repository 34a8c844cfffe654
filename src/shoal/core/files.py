"""Files written for a user (a report, an exported model): whole or not at all.

:func:`write_whole` writes into ``OUT.partial`` beside ``out`` and renames it
over ``out`` once complete, so a reader never sees half a file; on any failure
the partial file is removed, and the ``OSError`` names ``out``, the path the
user gave, not the partial file.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_whole(out: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``out`` with ``write`` (handed the open file), whole or not at all.

    A folder at ``out`` is refused before anything is written
    (:class:`IsADirectoryError`); any other ``OSError`` is raised again with
    ``out`` as its file name, and nothing is left behind.
    """
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(out))
    partial = out.with_name(out.name + ".partial")
    try:
        with partial.open("wb") as handle:
            write(handle)
        partial.replace(out)
    except OSError as exc:
        if exc.errno is None:  # not the system's (a library's own): as it is
            raise
        raise OSError(exc.errno, exc.strerror, str(out)) from exc  # its subclass, by errno
    finally:
        partial.unlink(missing_ok=True)  # gone already when the write succeeded
