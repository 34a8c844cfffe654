"""``shoal versions require|list|clear`` on a coordinator's registry: the versioning matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from shoal.cli import app
from shoal.registry import Component, VersionMatrix, registry_location

MODEL = "mobilenet-v3"


def shoal(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(arg) for arg in args])


def shoal_json(*args: str | Path) -> Any:
    result = shoal(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_require_list_and_clear(tmp_path: Path) -> None:
    folder = ("--state-dir", tmp_path)
    assert shoal_json("versions", "require", MODEL, "--component", "app", "--minimum", "2.4.0",
                      *folder) == [
        {"model": MODEL, "component": "app", "minimum": "2.4.0", "allowed": None}
    ]  # fmt: skip
    shoal_json("versions", "require", MODEL, "--component", "RUNTIME",
               "--allowed", "1.3.0", "--allowed", "1.2.0", *folder)  # fmt: skip
    shoal_json("versions", "require", "other", "--component", "feature_extractor",
               "--minimum", "3", *folder)  # fmt: skip
    listed = shoal_json("versions", "list", *folder)
    assert [(row["model"], row["component"]) for row in listed] == [
        (MODEL, "app"),
        (MODEL, "runtime"),
        ("other", "feature_extractor"),
    ]
    assert listed[1]["allowed"] == ["1.2.0", "1.3.0"]
    assert [row["model"] for row in shoal_json("versions", "list", "other", *folder)] == ["other"]
    # the coordinator reads the same matrix
    with registry_location(tmp_path, None).open() as database:
        required = VersionMatrix(database).requirements(MODEL)
    assert [requirement.component for requirement in required] == [
        Component.APP,
        Component.RUNTIME,
    ]
    table = shoal("versions", "list", *folder).stdout
    assert "1.2.0, 1.3.0" in table and "2.4.0" in table
    assert shoal_json("versions", "clear", MODEL, "--component", "app", *folder) == {
        "model": MODEL,
        "removed": 1,
    }
    assert shoal_json("versions", "clear", MODEL, *folder)["removed"] == 1
    assert [row["model"] for row in shoal_json("versions", "list", *folder)] == ["other"]
    assert shoal_json("versions", "clear", MODEL, *folder)["removed"] == 0
    shoal_json("versions", "clear", "other", *folder)
    assert "every client version may train" in shoal("versions", "list", *folder).stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--component", "app", "--minimum", "2.4-beta"], 2, "not a dotted numeric version"),
        (["--component", "app"], 2, "give --minimum, --allowed, or both"),
        (["--component", "apps", "--minimum", "2"], 2, "'apps' is not one of"),
        (["--component", "app", "--allowed", ""], 2, "1 to 64 characters"),
    ],
)
def test_a_bad_requirement_is_one_clear_error(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    result = shoal("versions", "require", MODEL, *args, "--state-dir", tmp_path)
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_listing_a_folder_without_a_registry_says_so(tmp_path: Path) -> None:
    result = shoal("versions", "list", "--state-dir", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert "no registry database" in result.output
