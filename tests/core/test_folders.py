"""A folder Shoal writes into is made, proven writable, or refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal.core.errors import RunError
from shoal.core.folders import writable_folder


def test_a_missing_folder_is_made_with_its_parents(tmp_path: Path) -> None:
    folder = writable_folder(tmp_path / "a" / "b", what="run folder")
    assert folder.is_dir() and list(folder.iterdir()) == []  # the probe leaves nothing


def test_an_existing_folder_is_kept(tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("x")
    assert writable_folder(tmp_path, what="run folder") == tmp_path
    assert [path.name for path in tmp_path.iterdir()] == ["kept.txt"]


@pytest.mark.parametrize(
    ("relative", "reason"), [("file", "File exists"), ("file/below", "Not a directory")]
)
def test_a_file_in_the_way_is_one_run_error(tmp_path: Path, relative: str, reason: str) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError) as caught:
        writable_folder(tmp_path / relative, what="coordinator.state_dir")
    assert str(caught.value) == (
        f"coordinator.state_dir {tmp_path / relative} cannot be written: {reason}"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(RunError, match="Permission denied"):
        writable_folder(tmp_path / "ro", what="run folder")
