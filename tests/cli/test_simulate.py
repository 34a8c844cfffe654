"""``shoal simulate`` as a user runs it: a real process, real files, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = [
    "--set", "data.num_clients=12",
    "--set", "round.clients_per_round=4",
    "--set", "evaluation.every=0",
    "--set", "simulation.workers=0",
    "--set", "round.deadline_s=600",  # the default devices' digits take longer than 15 s
]  # fmt: skip


def shoal(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from shoal.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_help_documents_every_option() -> None:
    result = shoal("simulate", "--help")
    assert result.returncode == 0
    for option in ("--rounds", "--seed", "--out", "--resume", "--set", "--quiet", "CONFIG.toml"):
        assert option in result.stdout


def test_simulate_prints_rounds_and_writes_the_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = shoal("simulate", "--rounds", "2", "--seed", "3", "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stderr
    assert "rounds_completed" in result.stdout
    lines = [
        line for line in result.stdout.splitlines() if line.strip().startswith(("1 fit", "2 fit"))
    ]
    assert len(lines) == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3
    assert summary["rounds_completed"] + summary["rounds_aborted"] == 2


def test_resume_continues_a_stopped_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert shoal("simulate", "-q", "--rounds", "1", "--out", str(out), *SMALL).returncode == 0
    result = shoal("simulate", "-q", "--resume", str(out), "--rounds", "3")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2, 3]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "round.nope=1"], "round.nope: unknown key"),
        (["--set", "strategy.name=fedfoo"], "strategy.name: unknown strategy 'fedfoo'; allowed:"),
        (["--set", "data.partition=random"], "data.partition: Input should be"),
        (["--set", "round.quorum=1.5"], "round.quorum: Input should be less than or equal to 1"),
        (["--set", "client.learning_rate=fast"], "client.learning_rate"),
        (["--set", "strategy.beta2=0.9"], "strategy: "),
        (["--set", "round"], "--set expects section.key=value"),
        (["missing.toml"], "config file not found"),
    ],
)
def test_bad_config_is_one_line_and_exit_code_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = shoal("simulate", "--out", str(tmp_path / "run"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_malformed_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[run\nrounds = 2\n")
    result = shoal("simulate", str(config))
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_resume_refuses_to_change_the_experiment(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert shoal("simulate", "-q", "--rounds", "1", "--out", str(out), *SMALL).returncode == 0
    result = shoal("simulate", "--resume", str(out), "--set", "client.epochs=3")
    assert result.returncode == 2 and "can only change run.rounds" in result.stderr
    missing = shoal("simulate", "--resume", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "not a Shoal run folder" in missing.stderr


def test_the_dropout_wave_example_shows_its_fallback(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "dropout-wave.toml"
    out = tmp_path / "run"
    settings = ["--set", "evaluation.every=0", "--set", "simulation.workers=0"]
    result = shoal("simulate", str(example), "--rounds", "3", "--out", str(out), *settings)
    assert result.returncode == 0, result.stderr
    assert "fallback reselect when 14 of 26 had dropped" in result.stdout
    assert "alert cohort_dropped" in result.stderr  # the logging hook: never silent
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    wave = rows[2]
    assert wave["fallback"]["kind"] == "reselect" and wave["fallback"]["replacements"] > 0
    assert wave["committed"]  # 12 of the first cohort reported: the replacements made the quorum


ROW_CONTRACT = {
    "round", "phase", "selected", "reported", "dropped", "loss", "accuracy", "virtual_time_s",
    "wall_time_s", "model_version", "bytes_up", "bytes_down",
}  # fmt: skip
SUMMARY_CONTRACT = {
    "rounds_completed", "final_accuracy", "final_loss", "wall_time_s", "virtual_time_s",
    "num_parameters", "bytes_up", "bytes_down",
}  # fmt: skip


def test_the_default_job_keeps_the_run_output_contract_and_adds_divergence(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    result = shoal("simulate", "-q", "--rounds", "1", "--out", str(out), "--set", SMALL[-1])
    assert result.returncode == 0, result.stderr
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(row) >= ROW_CONTRACT, ROW_CONTRACT - set(row)
    assert row["divergence_available"] is True and row["divergence_median"] > 0
    assert set(json.loads((out / "summary.json").read_text())) >= SUMMARY_CONTRACT
    assert (out / "pseudonym.key").stat().st_mode & 0o077 == 0  # the key stays the operator's


def test_simulate_says_when_the_model_splits_into_cluster_models(tmp_path: Path) -> None:
    job = Path(__file__).resolve().parents[2] / "examples" / "day-night" / "job.toml"
    result = shoal(
        "simulate", str(job), "--rounds", "2", "--out", str(tmp_path / "run"),
        "--set", "clustering.start='flagged'", "--set", "evaluation.every=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if "cluster models" in line]
    assert said == ["      clustered: the model splits into 2 cluster models (6 and 4 clients)"]
