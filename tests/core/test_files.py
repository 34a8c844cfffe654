"""Files written whole or not at all: a folder at the path, a failed write, nothing left."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pytest

from shoal.core.files import write_whole


def test_a_file_is_written_whole_and_replaces_the_old_one(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    write_whole(out, lambda handle: handle.write(b"new"))
    assert out.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [out]
    write_whole(out, lambda handle: None)  # the empty file
    assert out.read_bytes() == b""


def test_a_folder_at_the_path_is_refused_by_its_name(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IsADirectoryError) as raised:
        write_whole(out, lambda handle: handle.write(b"x"))
    assert raised.value.filename == str(out)
    assert sorted(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []


def test_a_failed_write_leaves_nothing_and_names_the_path_given(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"

    def half_then_fail(handle: BinaryIO) -> None:
        handle.write(b"half")
        raise OSError(28, "No space left on device", "somewhere")

    with pytest.raises(OSError, match="No space left") as raised:
        write_whole(out, half_then_fail)
    assert raised.value.filename == str(out)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError) as missing:
        write_whole(tmp_path / "no" / "out.bin", lambda handle: None)
    assert missing.value.filename == str(tmp_path / "no" / "out.bin")
