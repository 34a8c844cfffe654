"""``[app] path``: relative folders are found from the config file's folder, as ``[policy]
files`` are, whatever the current directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shoal.client.app import with_config_folder
from shoal.config import load_config

APP_MODULE = "from shoal.apps.builtin import client_app\n"  # the built-in app, under a new name


def job_folder(tmp_path: Path) -> Path:
    """A job folder: ``job.toml`` naming ``lib_app:client_app``, with ``lib_app.py`` in ``lib``."""
    folder = tmp_path / "job"
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "lib_app.py").write_text(APP_MODULE)
    (folder / "job.toml").write_text(
        "[run]\nrounds = 1\n[data]\nnum_clients = 6\n[round]\nclients_per_round = 3\n"
        "[evaluation]\nevery = 0\n[simulation]\nworkers = 0\n"
        '[app]\nclient = "lib_app:client_app"\npath = ["lib"]\n'
    )
    return folder


def test_a_relative_app_path_is_found_from_the_config_folder(tmp_path: Path) -> None:
    folder = job_folder(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "simulate", "-q", str(folder / "job.toml"),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, cwd=elsewhere, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "summary.json").is_file()


def test_the_config_folder_comes_first_and_absolute_folders_stay(tmp_path: Path) -> None:
    folder = job_folder(tmp_path)
    other = tmp_path / "other"
    path = f'path = ["lib", "{other.as_posix()}"]'
    job = folder / "job.toml"
    job.write_text(job.read_text().replace('path = ["lib"]', path))
    config = with_config_folder(load_config(job), job)
    expected = [str(folder.resolve()), str(folder.resolve() / "lib"), str(other)]
    assert config.app.path == expected
    assert with_config_folder(config, job).app.path == expected  # as a resume finds it
