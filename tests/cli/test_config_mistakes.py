"""``shoal simulate`` refuses a mistaken config or command line in one line, exit code 2, before
anything runs: a boolean where a number goes, ``--out`` beside ``--resume``."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.user_errors import EXIT_CONFIG, invoke, one_line_error

SMALL = [
    "--set", "run.rounds=1",
    "--set", "data.num_clients=6",
    "--set", "round.clients_per_round=3",
    "--set", "evaluation.every=0",
    "--set", "simulation.workers=0",
    "--set", "round.deadline_s=600",  # the default devices' digits take longer than 15 s
]  # fmt: skip


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a default run folder would land here, never in the repo


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("run.rounds=true", "run.rounds: Input should be a valid integer"),  # ran 1 round
        ("client.learning_rate=true", "client.learning_rate: Input should be a valid number"),
        ("data.num_clients=false", "data.num_clients: Input should be a valid integer"),
        ("privacy.epsilon=true", "privacy.epsilon: Input should be a valid number"),
    ],
)
def test_a_boolean_for_a_number_is_one_line(tmp_path: Path, override: str, expected: str) -> None:
    result = invoke("simulate", "--out", tmp_path / "run", *SMALL, "--set", override)
    line = one_line_error(result, code=EXIT_CONFIG)
    assert line == f"config error: {expected}"
    assert not (tmp_path / "run").exists()


def test_resume_with_another_out_folder_is_one_line(tmp_path: Path) -> None:
    """``--out`` beside ``--resume`` was ignored: the run went on in the resumed folder."""
    run = tmp_path / "run"
    assert invoke("simulate", "-q", "--out", run, *SMALL).exit_code == 0
    result = invoke("simulate", "--resume", run, "--out", tmp_path / "other", "--rounds", "2")
    one_line_error(result, code=EXIT_CONFIG, contains=("config error:", "--resume", "--out"))
    assert not (tmp_path / "other").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # not resumed either
