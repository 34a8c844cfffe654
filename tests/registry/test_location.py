"""Where a coordinator's registries live: its state folder by default, or the URLs given."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.core import ConfigError, RegistryError
from shoal.registry import blob_location, registry_location


def test_the_default_is_the_sqlite_file_in_the_state_folder(tmp_path: Path) -> None:
    location = registry_location(tmp_path / "state", None)
    assert location.sqlite_file == tmp_path / "state" / "registry" / "registry.db"
    assert str(location) == str(location.sqlite_file)
    with pytest.raises(RegistryError, match="no registry database at"):
        location.open(must_exist=True)
    assert not (tmp_path / "state").exists()  # a refused open creates nothing
    location.open().close()
    assert location.sqlite_file.is_file()
    location.open(must_exist=True).close()


def test_an_empty_url_means_the_default(tmp_path: Path) -> None:
    assert registry_location(tmp_path, "") == registry_location(tmp_path, None)
    assert blob_location(tmp_path, "") == str(tmp_path / "blobs")


def test_a_sqlite_url_names_its_own_file(tmp_path: Path) -> None:
    location = registry_location(tmp_path / "state", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert location.sqlite_file == tmp_path / "elsewhere.db"
    with pytest.raises(RegistryError, match=r"elsewhere\.db"):
        location.open(must_exist=True)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://shoal:secret@db.example.com/fl", "postgresql://shoal:***@db.example.com/fl"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
    ],
)
def test_a_database_that_is_not_a_file(url: str, shown: str) -> None:
    location = registry_location(Path("state"), url)
    assert location.sqlite_file is None
    assert str(location) == shown


def test_an_in_memory_database_opens_even_when_it_must_exist() -> None:
    registry_location(Path("unused"), "sqlite:///:memory:").open(must_exist=True).close()


def test_a_bad_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a database URL"):
        registry_location(Path("state"), "no url at all").open()


def test_blobs_default_to_the_state_folder() -> None:
    assert blob_location(Path("state"), None) == str(Path("state") / "blobs")
    assert blob_location(Path("state"), "s3://bucket/shoal") == "s3://bucket/shoal"
