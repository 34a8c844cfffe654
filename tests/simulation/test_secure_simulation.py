"""`shoal simulate` with SecAgg+: the model of plain FedAvg, dropouts recovered, reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.config import load_config, parse_config
from shoal.core import ConfigError
from shoal.simulation.runner import Simulation

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "secagg.toml"


def _run(tmp_path: Path, name: str, *overrides: str) -> dict[str, object]:
    config = load_config(EXAMPLE, ["simulation.workers=0", *overrides])
    return Simulation(config, tmp_path / name).run()


def test_the_example_records_the_protocol_aborts_and_recoveries(tmp_path: Path) -> None:
    summary = _run(tmp_path, "secure", "run.rounds=12")
    assert summary["secure_aggregation"] == "secagg+"
    assert summary["rounds_completed"] >= 8
    assert summary["clients_recovered"] > 0
    assert summary["rounds_aborted_below_threshold"] == summary["rounds_aborted"]
    lines = (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    fits = [row for row in rows if row["phase"] == "fit"]
    assert all(row["secure_aggregation"] == "secagg+" for row in fits)
    assert all(set(row["secure_dropped"]) >= {"advertise_keys"} for row in fits)
    assert sum(row["recovered"] for row in fits) == summary["clients_recovered"]
    assert all(row["bytes_up"] > 0 for row in fits)


def test_secure_and_plain_runs_train_the_same_model(tmp_path: Path) -> None:
    no_stage_dropout = "secure_aggregation.stage_dropout=0.0"
    secure = _run(tmp_path, "secure", "run.rounds=10", no_stage_dropout)
    plain = _run(tmp_path, "plain", "run.rounds=10", "secure_aggregation.protocol='none'")
    assert plain["secure_aggregation"] == "none"
    assert secure["final_accuracy"] == pytest.approx(plain["final_accuracy"], abs=0.05)


def test_a_secure_run_is_reproducible_bit_for_bit(tmp_path: Path) -> None:
    first = _run(tmp_path, "one", "run.rounds=3")
    second = _run(tmp_path, "two", "run.rounds=3")
    assert first["model_sha256"] == second["model_sha256"]


def test_a_robust_strategy_with_secure_aggregation_is_refused(tmp_path: Path) -> None:
    config = parse_config(
        {"strategy": {"name": "fedmedian"}, "secure_aggregation": {"protocol": "secagg+"}}
    )
    with pytest.raises(ConfigError, match="needs each client's update"):
        Simulation(config, tmp_path / "refused")


def test_a_homomorphic_run_against_a_key_holder_service(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from shoal.cli import app
    from shoal.transport.keyholder_service import serve_keyholder

    runner = CliRunner()
    keys = tmp_path / "banks.json"
    made = runner.invoke(app, ["keyholder", "silo-keys", "--out", str(keys), "--simulated", "5"])
    assert made.exit_code == 0, made.output
    init = runner.invoke(
        app,
        ["keyholder", "init", "--dir", str(tmp_path / "kh"), "-k", "3", "--silos-file", str(keys)],
    )
    assert init.exit_code == 0, init.output
    server = serve_keyholder(tmp_path / "kh", address="127.0.0.1:0", insecure=True)
    try:
        banks = EXAMPLE.with_name("cross-silo-banks.toml")
        overrides = [
            "run.rounds=2",
            "simulation.workers=0",
            f"secure_aggregation.key_holder='127.0.0.1:{server.port}'",
            f"secure_aggregation.silo_keys='{keys}'",
        ]
        summary = Simulation(load_config(banks, overrides), tmp_path / "run").run()
        assert summary["rounds_completed"] == 2
        assert not (tmp_path / "run" / "key-holder").exists()  # the secret key stayed away
        again = Simulation(load_config(banks, overrides), tmp_path / "again").run()
        assert again["rounds_aborted"] == 2  # the same run and rounds are never decrypted twice
    finally:
        server.stop(grace_s=0)
