"""A folder Shoal writes into is made, proven writable, or refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal.core.errors import RunError
from shoal.core.folders import LOCK_FILE, hold_folder, writable_folder


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


def test_a_held_folder_is_refused_to_a_second_hold_naming_the_holder(tmp_path: Path) -> None:
    with hold_folder(tmp_path / "run", what="run folder") as hold:
        assert hold.held and (tmp_path / "run" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunError) as caught:
            hold_folder(tmp_path / "run", what="run folder")  # another descriptor: refused too
    assert str(caught.value) == (
        f"run folder {tmp_path / 'run'} is in use by another shoal process (pid {os.getpid()}): "
        "wait for it to end, or use another folder"
    )
    assert not hold.held


def test_a_released_hold_lets_the_next_one_in_and_releasing_twice_is_nothing(
    tmp_path: Path,
) -> None:
    first = hold_folder(tmp_path, what="run folder")
    first.release()
    first.release()
    with hold_folder(tmp_path, what="run folder") as second:
        assert second.held and not first.held
    assert (tmp_path / LOCK_FILE).exists()  # kept: a removed lock file could be held twice


def test_a_holder_whose_pid_cannot_be_read_is_refused_without_it(tmp_path: Path) -> None:
    with hold_folder(tmp_path, what="coordinator.state_dir"):
        (tmp_path / LOCK_FILE).write_text("")  # the holder has not written its pid yet
        with pytest.raises(RunError, match=r"in use by another shoal process: wait"):
            hold_folder(tmp_path, what="coordinator.state_dir")


def test_a_collected_hold_is_released(tmp_path: Path) -> None:
    hold_folder(tmp_path, what="run folder")  # dropped at once
    hold_folder(tmp_path, what="run folder").release()
