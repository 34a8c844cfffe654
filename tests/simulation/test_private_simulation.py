"""`shoal simulate` with user-level DP: epsilon per round, the budget stops training, placements."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shoal.config import parse_config
from shoal.core import ConfigError
from shoal.simulation.runner import Simulation, final_parameters

pytestmark = pytest.mark.filterwarnings("ignore::shoal.privacy.noise.InsecureNoiseWarning")

BASE: dict[str, Any] = {
    "run": {"rounds": 6, "seed": 1},
    "data": {"num_clients": 60},
    "round": {"clients_per_round": 10, "over_selection": 1.0},
    "evaluation": {"every": 0},
    "simulation": {"workers": 0},
}


def _run(tmp_path: Path, name: str, **sections: dict[str, Any]) -> tuple[dict[str, Any], list]:
    data = {**BASE, **sections}
    summary = Simulation(parse_config(data), tmp_path / name).run()
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return summary, [json.loads(line) for line in lines]


def test_central_dp_records_epsilon_per_round_and_stops_at_the_budget(tmp_path: Path) -> None:
    privacy = {
        "placement": "central",
        "noise_multiplier": 1.0,
        "epsilon": 2.5,
        "secure_noise": False,
    }
    summary, rows = _run(tmp_path, "central", privacy=privacy)
    epsilons = [row["epsilon"] for row in rows]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert all(row["delta"] == pytest.approx(1 / 60) for row in rows)
    assert all(row["noise_multiplier"] == 1.0 and row["clip_norm"] == 1.0 for row in rows)
    assert all(row["loss"] is None for row in rows)  # the clients' training loss stays on them
    assert summary["epsilon"] == pytest.approx(epsilons[-1]) and summary["epsilon"] <= 2.5
    assert summary["rounds_completed"] < 6  # the budget ran out before the planned rounds
    assert "training stops and the data locks" in summary["privacy_locked"]
    assert summary["accounting"] == "rdp/fixed/improved"
    assert summary["sampling_rate"] == pytest.approx(10 / 60)


def test_the_noise_multiplier_is_calibrated_to_spend_the_budget_in_the_planned_rounds(
    tmp_path: Path,
) -> None:
    privacy = {"placement": "central", "epsilon": 4.0, "secure_noise": False, "sampling": "poisson"}
    # a Poisson cohort of 10 expected below the default quorum of 8 would skip its round
    rounds = {"clients_per_round": 10, "over_selection": 1.0, "quorum": 0.3}
    summary, _ = _run(tmp_path, "calibrated", privacy=privacy, round=rounds)
    assert summary["rounds_completed"] == 6
    assert 3.8 < summary["epsilon"] <= 4.0
    assert summary["accounting"] == "rdp/poisson/improved"


def test_local_and_adaptive_central_placements_run(tmp_path: Path) -> None:
    local, _ = _run(
        tmp_path,
        "local",
        privacy={"placement": "local", "noise_multiplier": 0.5, "secure_noise": False},
    )
    assert local["privacy"] == "local" and local["rounds_completed"] == 6
    assert local["sampling_rate"] == 1.0  # a client's own release is not amplified
    adaptive, rows = _run(
        tmp_path,
        "adaptive",
        privacy={
            "placement": "central",
            "noise_multiplier": 1.0,
            "adaptive_clipping": True,
            "clip_norm": 0.01,
            "secure_noise": False,
        },
    )
    assert adaptive["rounds_completed"] == 6
    assert rows[-1]["clip_norm"] > rows[0]["clip_norm"]  # almost every update was clipped: C grows


def test_an_adaptive_dp_run_resumed_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    # the clip norm a round leaves travels with its version, and seeded noise is drawn per
    # round: a restart neither resets adaptive clipping nor replays the first rounds' noise
    privacy = {
        "placement": "central",
        "noise_multiplier": 1.0,
        "adaptive_clipping": True,
        "clip_norm": 0.01,
        "secure_noise": False,
    }
    _, whole = _run(tmp_path, "whole", privacy=privacy)
    _run(tmp_path, "parts", privacy=privacy, run={"rounds": 3, "seed": 1})
    resumed = Simulation(
        parse_config({**BASE, "privacy": privacy}), tmp_path / "parts", resume=True
    )
    resumed.run()
    lines = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    parts = [json.loads(line) for line in lines]
    for row in [*whole, *parts]:
        row.pop("wall_time_s")
    assert whole[3]["clip_norm"] == pytest.approx(whole[2]["next_clip_norm"]) != 0.01
    assert parts == whole
    assert (
        final_parameters(tmp_path / "parts").sha256()
        == final_parameters(tmp_path / "whole").sha256()
    )


def test_distributed_dp_runs_with_secagg_and_dropouts(tmp_path: Path) -> None:
    summary, rows = _run(
        tmp_path,
        "distributed",
        privacy={"placement": "distributed", "noise_multiplier": 1.0, "secure_noise": False},
        secure_aggregation={"protocol": "secagg+", "stage_dropout": 0.1},
        round={"clients_per_round": 10, "over_selection": 1.5, "quorum": 0.6},
    )
    assert summary["privacy"] == "distributed"
    assert summary["secure_aggregation"] == "secagg+"
    assert summary["rounds_completed"] >= 4
    assert summary["clients_recovered"] > 0
    assert all("epsilon" in row for row in rows)
    assert all(row["loss"] is None for row in rows)  # not even as a secure sum


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        (
            {"privacy": {"placement": "distributed", "noise_multiplier": 1.0}},
            "secure_aggregation.protocol = 'secagg\\+'",
        ),
        (
            {
                "privacy": {
                    "placement": "central",
                    "noise_multiplier": 1.0,
                    "adaptive_clipping": True,
                },
                "secure_aggregation": {"protocol": "secagg+"},
            },
            "adaptive_clipping",
        ),
        ({"privacy": {"placement": "central"}}, "set epsilon"),
        (
            {
                "privacy": {
                    "placement": "distributed",
                    "noise_multiplier": 1.0,
                    "sampling": "poisson",
                },
                "secure_aggregation": {"protocol": "secagg+", "bits": 16},
            },
            "leave bits unset",
        ),
        (
            {
                "privacy": {"placement": "central", "noise_multiplier": 1.0},
                "strategy": {"name": "fedmedian"},
            },
            "mean of clipped updates",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused(
    tmp_path: Path, sections: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        Simulation(parse_config({**BASE, **sections}), tmp_path / "refused")


def test_mlflow_logs_epsilon_per_round_and_the_alert_fires_at_exhaustion(tmp_path: Path) -> None:
    import sys

    mlflow = pytest.importorskip("mlflow")
    marker = tmp_path / "alert.json"
    command = f"{sys.executable} -c \"import sys; open('{marker}', 'w').write(sys.stdin.read())\""
    privacy = {
        "placement": "central",
        "noise_multiplier": 1.0,
        "epsilon": 2.5,
        "secure_noise": False,
        "alert_command": command,
    }
    summary, rows = _run(tmp_path, "tracked", privacy=privacy, tracking={"mlflow": True})
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'tracked' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("shoal")
    run = client.search_runs([experiment.experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "privacy_epsilon")
    assert [point.step for point in history] == [row["round"] for row in rows]
    assert history[-1].value == pytest.approx(summary["epsilon"])
    assert run.info.status == "FINISHED"
    alert = json.loads(marker.read_text())
    assert alert["kind"] == "budget_exhausted" and alert["round"] == len(rows) + 1


def test_poisson_sampling_draws_binomial_cohorts_in_a_simulation(tmp_path: Path) -> None:
    privacy = {
        "placement": "central",
        "noise_multiplier": 1.0,
        "sampling": "poisson",
        "secure_noise": False,
    }
    rounds = {"clients_per_round": 10, "over_selection": 1.0, "quorum": 0.3}
    summary, rows = _run(
        tmp_path, "poisson", privacy=privacy, round=rounds, run={"rounds": 16, "seed": 1}
    )
    selected = [row["selected"] for row in rows]
    # each of the 60 joins with q = 1/6: Binomial(60, 1/6), never exactly 10 every round
    assert len(set(selected)) > 3 and 7 <= sum(selected) / len(selected) <= 13
    assert all(row["sampling_rate"] == pytest.approx(10 / 60) for row in rows)
    assert all(row["population"] == 60 for row in rows)
    assert all(row["reported"] == row["selected"] for row in rows if row["committed"])
    assert summary["sampling_rate"] == pytest.approx(10 / 60)


def participants(folder: Path) -> list[str]:
    from shoal.registry import registry_location
    from shoal.registry.privacy import PrivacyLedger

    database = registry_location(folder, None).open()
    try:
        return [entry.participants_sha256 for entry in PrivacyLedger(database).rounds("shoal-run")]
    finally:
        database.close()


def test_dp_cohorts_come_from_the_csprng_unless_noise_is_seeded(tmp_path: Path) -> None:
    for secure in (True, False):
        privacy = {"placement": "central", "noise_multiplier": 1.0, "secure_noise": secure}
        short = {"rounds": 2, "seed": 1, "name": "shoal-run"}
        _run(tmp_path, f"one-{secure}", privacy=privacy, run=short)
        _run(tmp_path, f"two-{secure}", privacy=privacy, run=short)
        one, two = (
            participants(tmp_path / f"one-{secure}"),
            participants(tmp_path / f"two-{secure}"),
        )
        assert len(one) == len(two) == 2
        # the same seed: the CSPRNG draws other cohorts; seeded ones are reproducible
        assert (one != two) is secure


def test_the_jobs_alert_hooks_are_told_when_the_budget_is_spent(tmp_path: Path) -> None:
    marker = tmp_path / "alert.json"
    command = f"cat > {marker}"
    privacy = {
        "placement": "central",
        "noise_multiplier": 1.0,
        "epsilon": 2.5,
        "secure_noise": False,
    }
    _, rows = _run(tmp_path, "alerted", privacy=privacy, alerts={"commands": [command]})
    alert = json.loads(marker.read_text())
    assert alert["kind"] == "budget_exhausted" and alert["round"] == len(rows) + 1
