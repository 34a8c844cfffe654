"""Content-addressed blob storage through fsspec: a local folder, ``memory://``, an object store.

A blob is stored under the sha256 of its bytes (``ROOT/sha256/ab/abcdef...``),
so writing the same content twice is harmless and a name can be checked
against what it holds: :meth:`BlobStore.get` re-hashes every blob it reads
and raises :class:`~shoal.core.errors.IntegrityError` on a mismatch.

Writes are atomic: on a local folder the bytes go to a temporary file that
is flushed to disk and then renamed over the target; on other filesystems a single put of the
whole object (atomic on object stores) does the job. :meth:`BlobStore.put_soon` names the blob
at once and writes it on the store's own thread: a registry commit that names it waits for the
write only when it commits (creating a file, syncing it or uploading it is mostly time in the
kernel or on the network, which the committing thread spends on its other statements).

An object store works when its fsspec package is installed (``s3fs`` for ``s3://``, ``gcsfs`` for
``gs://``, ``adlfs`` for ``az://``).

>>> store = BlobStore("memory://doctest-blobs")
>>> digest = store.put(b"weights")
>>> store.get(digest)
b'weights'
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import fsspec  # type: ignore[import-untyped]
from fsspec.implementations.local import LocalFileSystem  # type: ignore[import-untyped]

from shoal.core.errors import ConfigError, IntegrityError, NotFoundError, RegistryError

_DIGEST = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """Blobs named by their sha256, under ``location`` (a path or an fsspec URL)."""

    def __init__(
        self, location: str | os.PathLike[str], *, durable: bool = True, **storage_options: Any
    ) -> None:
        """``durable=False`` skips the fsyncs of local writes: still atomic, but a power
        cut may lose the newest blobs (fine for a simulation, which replays them)."""
        self.location = os.fspath(location)
        self.durable = durable
        try:
            filesystem, root = fsspec.core.url_to_fs(self.location, **storage_options)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"cannot open blob store {self.location!r}: {exc}") from exc
        self.filesystem: Any = filesystem  # an fsspec AbstractFileSystem
        self._root = str(root).rstrip("/")
        self._local = isinstance(self.filesystem, LocalFileSystem)
        self._writer: ThreadPoolExecutor | None = None  # put_soon's thread (made on first use)
        self._writer_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BlobStore({self.location!r})"

    def path(self, digest: str) -> str:
        """Where the blob named ``digest`` lives in :attr:`filesystem`."""
        if _DIGEST.fullmatch(digest) is None:
            raise RegistryError(f"not a sha256 hex digest: {digest!r}")
        return f"{self._root}/sha256/{digest[:2]}/{digest}"

    def put(self, data: bytes) -> str:
        """Store ``data`` (atomically) and return its sha256, the name to get it back by."""
        digest = sha256_hex(data)
        if not self._held(digest, data):
            self._write(digest, data)
        return digest

    def put_soon(self, data: bytes) -> tuple[str, Future[None] | None]:
        """The sha256 of ``data`` now, and the write of ``data`` under it on the store's own
        thread (None: the store holds it already). The future raises what :meth:`put` would;
        until it is done, the blob may be absent."""
        digest = sha256_hex(data)
        if self._held(digest, data):
            return digest, None
        with self._writer_lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-blobs")
            return digest, self._writer.submit(self._write, digest, data)

    def close(self) -> None:
        """Wait for the writes :meth:`put_soon` started, and end its thread."""
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def _held(self, digest: str, data: bytes) -> bool:
        """Whether a local store holds ``data`` already, intact (a rewrite would change
        nothing; a corrupt copy is rewritten)."""
        try:
            return self._local and _holds(self.path(digest), data)
        except OSError as exc:
            raise RegistryError(f"cannot read blob {digest[:16]}... in {self}: {exc}") from exc

    def _write(self, digest: str, data: bytes) -> None:
        target = self.path(digest)
        try:
            if self._local:
                _write_local_file(target, data, durable=self.durable)
            else:
                self.filesystem.pipe_file(target, data)
        except OSError as exc:
            raise RegistryError(f"cannot write blob {digest[:16]}... to {self}: {exc}") from exc

    def get(self, digest: str) -> bytes:
        """The bytes named ``digest``, verified against it."""
        target = self.path(digest)
        try:
            data: bytes = self.filesystem.cat_file(target)
        except FileNotFoundError as exc:
            raise NotFoundError(f"no blob {digest[:16]}... in {self}") from exc
        except OSError as exc:
            raise RegistryError(f"cannot read blob {digest[:16]}... from {self}: {exc}") from exc
        actual = sha256_hex(data)
        if actual != digest:
            raise IntegrityError(
                f"blob {digest[:16]}... in {self} is corrupt: its content hashes to "
                f"{actual[:16]}..."
            )
        return data

    def exists(self, digest: str) -> bool:
        try:
            return bool(self.filesystem.exists(self.path(digest)))
        except OSError as exc:
            raise RegistryError(f"cannot reach blob store {self}: {exc}") from exc

    def delete(self, digest: str) -> None:
        """Remove a blob (:class:`NotFoundError` when absent)."""
        try:
            self.filesystem.rm_file(self.path(digest))
        except FileNotFoundError as exc:
            raise NotFoundError(f"no blob {digest[:16]}... in {self}") from exc
        except OSError as exc:
            raise RegistryError(f"cannot delete blob {digest[:16]}... in {self}: {exc}") from exc


def _holds(target: str, data: bytes) -> bool:
    """Whether the file ``target`` holds exactly ``data`` (a corrupt copy is rewritten)."""
    try:
        if os.path.getsize(target) != len(data):
            return False
        with open(target, "rb") as stream:
            return stream.read() == data
    except FileNotFoundError:
        return False


def _write_local_file(target: str, data: bytes, *, durable: bool) -> None:
    """Write, flush to disk, then rename over ``target``: readers see all or nothing."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    partial = f"{target}.partial-{uuid.uuid4().hex}"
    try:
        with open(partial, "wb") as stream:
            stream.write(data)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    if not durable:
        return
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)
