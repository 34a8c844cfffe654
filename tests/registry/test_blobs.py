"""Content-addressed blobs through fsspec: round trips, atomic writes, corruption detected."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.core import ConfigError, IntegrityError, NotFoundError, RegistryError
from shoal.registry import BlobStore
from shoal.registry import blobs as blobs_module


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        yield BlobStore(tmp_path / "blobs")
        return
    store = BlobStore(f"memory://shoal-test-{uuid.uuid4().hex}")
    yield store
    forget(store)


def forget(store: BlobStore) -> None:
    """Drop a memory store's blobs, which would otherwise outlive the test."""
    root = store.location.removeprefix("memory://")
    if store.filesystem.exists(root):
        store.filesystem.rm(root, recursive=True)


def overwrite(store: BlobStore, digest: str, data: bytes) -> None:
    """Corrupt a stored blob behind the store's back."""
    store.filesystem.pipe_file(store.path(digest), data)


@pytest.mark.parametrize("data", [b"", b"weights", bytes(range(256)) * 1000])
def test_a_blob_comes_back_under_its_sha256(store: BlobStore, data: bytes) -> None:
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.exists(digest)
    assert store.get(digest) == data


def test_putting_the_same_content_twice_is_harmless(store: BlobStore) -> None:
    assert store.put(b"same") == store.put(b"same")
    assert store.get(hashlib.sha256(b"same").hexdigest()) == b"same"


def test_a_corrupt_blob_is_detected_and_rewriting_heals_it(store: BlobStore) -> None:
    digest = store.put(b"original")
    overwrite(store, digest, b"originaL")
    with pytest.raises(IntegrityError, match="corrupt"):
        store.get(digest)
    store.put(b"original")
    assert store.get(digest) == b"original"


def test_missing_blobs_and_bad_names(store: BlobStore) -> None:
    absent = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(absent)
    with pytest.raises(NotFoundError):
        store.get(absent)
    with pytest.raises(NotFoundError):
        store.delete(absent)
    for name in ["", "abc", "../" + "a" * 61, absent.upper()]:
        with pytest.raises(RegistryError, match="sha256"):
            store.get(name)


def test_delete_removes_a_blob(store: BlobStore) -> None:
    digest = store.put(b"gone soon")
    store.delete(digest)
    assert not store.exists(digest)


def test_local_writes_leave_no_partial_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    for index in range(5):
        store.put(f"blob {index}".encode())
    files = sorted(path for path in tmp_path.rglob("*") if path.is_file())
    assert len(files) == 5
    assert all(
        ".partial" not in path.name and path.parent.parent.name == "sha256" for path in files
    )


def test_a_local_folder_url_works(tmp_path: Path) -> None:
    store = BlobStore(f"file://{tmp_path}")
    digest = store.put(b"x")
    assert BlobStore(tmp_path).get(digest) == b"x"


def test_an_unknown_protocol_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot open blob store"):
        BlobStore("nosuchprotocol://bucket/blobs")


def test_put_soon_names_the_blob_at_once_and_writes_it_on_the_stores_thread(
    store: BlobStore,
) -> None:
    data = b"a version's weights"
    before = set(threading.enumerate())
    digest, written = store.put_soon(data)
    (thread,) = set(threading.enumerate()) - before
    assert digest == hashlib.sha256(data).hexdigest()
    assert written is not None
    written.result()
    assert store.get(digest) == data
    again, rewritten = store.put_soon(data)
    if store.location.startswith("memory://"):
        assert rewritten is not None  # only a local folder is checked for the blob first
    else:
        assert (again, rewritten) == (digest, None)  # held already: nothing to write
    store.close()
    assert thread.name.startswith("shoal-blobs") and not thread.is_alive()
    _, after_close = store.put_soon(b"more")  # a closed store writes on a new thread
    assert after_close is not None and after_close.result() is None
    store.close()


def test_put_soon_raises_the_writes_error_through_its_future(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(target: str, data: bytes, *, durable: bool) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(blobs_module, "_write_local_file", full)
    store = BlobStore(tmp_path / "blobs")
    _, written = store.put_soon(b"weights")
    assert written is not None
    with pytest.raises(RegistryError, match="No space left"):
        written.result()
    store.close()
