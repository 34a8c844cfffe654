"""The replay guard's nonces kept in the state folder, so a restart does not forget them.

The :class:`~shoal.transport.signing.ReplayGuard` refuses a request whose
nonce it has seen within its window (300 s). It holds them in memory: a
coordinator restarted within the window would accept again any request
captured before the restart. :class:`NonceJournal` appends each accepted
nonce to ``replay-nonces.bin`` in the coordinator's state folder (one
``write``: the OS keeps it when the process dies, ``kill -9`` included) and
gives the guard back the unexpired ones when the coordinator starts.

The file is rewritten with only the live nonces when it opens and whenever
it has grown to twice what the guard holds (plus a margin): it never holds
more than about two windows of requests. A record torn by a crash in the
middle of a write, or a file that is not a journal, ends what is read, with
a warning: the nonces before it are kept.

It is not ``fsync``-ed per request: a crash of the machine (not of the
process) loses what the OS had not yet written, a few seconds' worth, which
a reboot mostly outlasts in a 300 s window.

>>> guard = ReplayGuard()  # doctest: +SKIP
>>> journal = NonceJournal.open(state_dir, guard, now=time.time())  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from shoal.core.errors import RunError
from shoal.transport.signing import Remembered, ReplayGuard

log = logging.getLogger("shoal.coordinator")

JOURNAL_FILE = "replay-nonces.bin"
_MAGIC = b"shoal.replay-nonces.v1\n"
_HEAD = struct.Struct(">dHHH")  # expires, then the lengths of client id, key and nonce
_MARGIN = 1024  # records appended past twice the live ones before the file is rewritten


def _record(entry: Remembered) -> bytes:
    client_id = entry.client_id.encode()
    head = _HEAD.pack(entry.expires, len(client_id), len(entry.key), len(entry.nonce))
    return head + client_id + entry.key + entry.nonce


def _records(data: bytes, path: Path) -> Iterator[Remembered]:
    """The records of a journal's bytes, up to the first that is torn or not a record."""
    if not data.startswith(_MAGIC):
        if data:
            log.warning("%s is not a nonce journal: its content is ignored", path)
        return
    at = len(_MAGIC)
    while at < len(data):
        if at + _HEAD.size > len(data):
            break
        expires, id_size, key_size, nonce_size = _HEAD.unpack_from(data, at)
        end = at + _HEAD.size + id_size + key_size + nonce_size
        if end > len(data):
            break
        body = data[at + _HEAD.size : end]
        try:
            client_id = body[:id_size].decode()
        except UnicodeDecodeError:
            break
        yield Remembered(
            expires, client_id, body[id_size : id_size + key_size], body[id_size + key_size :]
        )
        at = end
    if at < len(data):
        log.warning("%s ends in a torn record (a crash while writing): it is dropped", path)


class NonceJournal:
    """The file that keeps a :class:`ReplayGuard`'s nonces across restarts."""

    def __init__(self, path: Path, guard: ReplayGuard, descriptor: int, *, live: int) -> None:
        self.path = path
        self.guard = guard
        self._descriptor: int | None = descriptor
        self._appended = 0  # records past the last rewrite
        self._live = live

    @classmethod
    def open(cls, folder: str | Path, guard: ReplayGuard, *, now: float) -> NonceJournal:
        """Give ``guard`` the unexpired nonces kept in ``folder``, rewrite the file with them,
        and keep every nonce the guard accepts from now on (its ``on_remember``)."""
        path = Path(folder) / JOURNAL_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise RunError(f"{path} cannot be read: {exc.strerror or exc}") from exc
        restored = guard.restore(_records(data, path), now=now)
        if restored:
            log.info("the replay guard holds %d nonces from before the restart", restored)
        journal = cls(path, guard, cls._rewrite(path, guard), live=len(guard))
        guard.on_remember = journal.append
        return journal

    @staticmethod
    def _rewrite(path: Path, guard: ReplayGuard) -> int:
        """Write the guard's live nonces to a new file that replaces ``path`` (a crash leaves
        the old one or the new one whole); its descriptor, open for appending."""
        fresh = path.with_name(path.name + ".new")
        body = _MAGIC + b"".join(_record(entry) for entry in guard.remembered())
        try:
            fresh.write_bytes(body)
            os.replace(fresh, path)
            return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            raise RunError(f"{path} cannot be written: {exc.strerror or exc}") from exc

    def append(self, entry: Remembered) -> None:
        """Keep ``entry`` (the guard's ``on_remember``). A file that refuses it costs one
        warning and the journal, not the request: the guard in memory still refuses replays
        until a restart (and a warning per request would flood the log)."""
        if self._descriptor is None:
            return
        try:
            os.write(self._descriptor, _record(entry))
            self._appended += 1
            if self._appended > self._live + _MARGIN:
                self.compact()
        except (OSError, RunError) as exc:
            log.warning(
                "the replay guard's journal %s failed (%s): nonces are kept in memory only "
                "until a restart",
                self.path,
                exc,
            )
            self.close()

    def compact(self) -> None:
        """Rewrite the file with only the nonces the guard still holds."""
        if self._descriptor is None:
            return
        os.close(self._descriptor)
        self._descriptor = None
        self._descriptor = self._rewrite(self.path, self.guard)
        self._live, self._appended = len(self.guard), 0

    def close(self) -> None:
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            with contextlib.suppress(OSError):  # a file that failed: nothing more to keep
                os.close(descriptor)
        if self.guard.on_remember == self.append:
            self.guard.on_remember = None
