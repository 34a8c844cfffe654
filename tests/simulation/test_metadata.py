"""What a simulated run stores about its clients: participants with divergence, under pseudonyms.

Each test plays a two-round run of 10 digits clients and reads back what a
metrics reader would: ``metrics.jsonl``, ``summary.json``, the model
versions' rows, and the ``policy_decisions`` and ``round_participants``
tables of the run's registry database.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from shoal.apps import client_app, server_app
from shoal.client.api import Client
from shoal.client.app import ClientContext
from shoal.config import load_config
from shoal.core import ConfigError, Parameters
from shoal.governance.pseudonyms import PSEUDONYM_KEY_FILE, Pseudonyms
from shoal.registry import registry_location
from shoal.simulation.population import client_name
from shoal.simulation.runner import Simulation

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLIENTS = [client_name(index) for index in range(10)]
HOUR = 3600
SMALL = [
    "simulation.workers=0",
    "run.rounds=2",
    "data.num_clients=10",
    "round.clients_per_round=5",
    "evaluation.every=0",
    "round.deadline_s=600",  # every round commits: the devices' stragglers are not the point
]
SECURE = [
    "secure_aggregation.stage_dropout=0.0",
    "secure_aggregation.advertise_keys_s=600",
    "secure_aggregation.share_keys_s=600",
    "secure_aggregation.unmask_s=600",
]


def simulate(folder: Path, *overrides: str, example: str | None = None) -> dict[str, Any]:
    config = load_config(None if example is None else EXAMPLES / example, [*SMALL, *overrides])
    return Simulation(config, folder).run()


def fit_rows(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["phase"] == "fit"]


def table(folder: Path, name: str) -> list[dict[str, Any]]:
    database = registry_location(folder, None).open()
    try:
        with database.read() as connection:
            rows = connection.execute(sa.text(f"SELECT * FROM {name}")).mappings().all()
    finally:
        database.close()
    return [dict(row) for row in rows]


def participants(folder: Path) -> list[dict[str, Any]]:
    return table(folder, "round_participants")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain run under pseudonyms, its times kept to the hour (read, never changed)."""
    folder = tmp_path_factory.mktemp("plain")
    simulate(folder, "run.name=pseudonymous", f"metadata.timestamp_granularity_s={HOUR}")
    return folder


def test_a_plain_round_keeps_each_counted_client_with_its_divergence(plain_run: Path) -> None:
    rows, kept = fit_rows(plain_run), participants(plain_run)
    for row in rows:
        assert row["committed"] and row["divergence_available"] is True
        assert row["divergence_flagged"] == 0  # honest clients
        assert 0 < row["divergence_median"] <= row["divergence_p90"] <= row["divergence_max"]
        mine = [entry for entry in kept if entry["round"] == row["round"]]
        assert len(mine) == row["reported"]  # one row per counted client
        assert {entry["model_version"] for entry in mine} == {row["model_version"]}
        for entry in mine:
            assert entry["l2_to_median"] >= 0 and -1 <= entry["cosine_to_median"] <= 1
            assert entry["flagged"] in (0, False)


def test_each_plain_fit_round_projects_its_clients_under_their_pseudonyms(plain_run: Path) -> None:
    rows, kept = fit_rows(plain_run), participants(plain_run)
    lines = (plain_run / "drift.jsonl").read_text().splitlines()
    projections = {record["round"]: record for record in map(json.loads, lines)}
    assert sorted(projections) == [row["round"] for row in rows]
    for row in rows:
        assert row["drift_available"] is True and row["drift_bimodal"] is False  # one population
        assert row["drift_clusters"] >= 1
        record = projections[row["round"]]
        mine = {entry["participant"] for entry in kept if entry["round"] == row["round"]}
        assert set(record["clients"]) == mine and not mine & set(CLIENTS)  # pseudonyms only
        assert len(record["points"]) == len(record["labels"]) == row["reported"]
        assert record["method"] == "pca" and len(record["explained_variance"]) == 2


def test_a_secure_round_keeps_its_participants_without_divergence(tmp_path: Path) -> None:
    simulate(tmp_path, *SECURE, example="secagg.toml")
    rows, kept = fit_rows(tmp_path), participants(tmp_path)
    assert rows and all(row["committed"] for row in rows)
    for row in rows:
        assert row["divergence_available"] is False
        assert "cannot exist under SecAgg+" in row["divergence_note"]
        assert "divergence_median" not in row
        assert row["drift_available"] is False and "SecAgg+" in row["drift_reason"]
        assert sum(entry["round"] == row["round"] for entry in kept) == row["reported"]
    measures = ("l2_to_aggregate", "cosine_to_median", "z_score", "flagged")
    assert all(entry[measure] is None for entry in kept for measure in measures)


def test_divergence_off_keeps_participants_without_measures(tmp_path: Path) -> None:
    simulate(tmp_path, "divergence.enabled=false")
    rows, kept = fit_rows(tmp_path), participants(tmp_path)
    assert len(kept) == sum(row["reported"] for row in rows) > 0
    assert all(entry["l2_to_median"] is None and entry["flagged"] is None for entry in kept)
    assert not any(key.startswith("divergence") for row in rows for key in row)


def stored_text(folder: Path) -> str:
    """Everything a metrics reader can read, as one text."""
    names = ("metrics.jsonl", "summary.json", "report.html")
    files = [(folder / name).read_text() for name in names]
    tables = [
        json.dumps(table(folder, name), default=str)
        for name in ("policy_decisions", "round_participants", "model_versions")
    ]
    return "\n".join(files + tables)


def test_a_metrics_reader_finds_no_client_and_no_exact_time(plain_run: Path) -> None:
    text = stored_text(plain_run)
    leaked = [client for client in CLIENTS if client in text]
    assert leaked == []
    decided = [row["decided_at"] for row in table(plain_run, "policy_decisions")]
    recorded = [row["recorded_at"] for row in participants(plain_run)]
    assert decided and recorded
    for moment in decided + recorded:
        moment = moment if isinstance(moment, datetime) else datetime.fromisoformat(moment)
        assert (moment.minute, moment.second, moment.microsecond) == (0, 0, 0)


class Leaky(Client):
    """A client whose failure names it, as a user's exception often does."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id

    def get_parameters(self) -> Parameters:
        raise AssertionError("the run starts from the server app's model")

    def fit(self, parameters: Parameters, config: Any) -> Any:
        raise RuntimeError(f"{self.client_id} ran out of memory.")

    def evaluate(self, parameters: Parameters, config: Any) -> Any:
        raise AssertionError("not evaluated here")


def leaky_or_builtin(context: ClientContext) -> Client:
    odd = (context.partition_index or 0) % 2
    return Leaky(context.client_id) if odd else client_app(context)


def test_a_failure_that_names_its_client_is_stored_under_its_pseudonym(tmp_path: Path) -> None:
    leaky = replace(client_app, client_fn=leaky_or_builtin)
    config = load_config(None, [*SMALL, "round.quorum=0.2", "run.name=leaky"])
    Simulation(config, tmp_path / "run", client_app=leaky, server_app=server_app).run()
    names = Pseudonyms.in_folder(tmp_path / "run", run_id="leaky")
    named = [
        (row["round"], reason.split()[1])  # "RuntimeError: NAME ran out of memory."
        for row in fit_rows(tmp_path / "run")
        for reason in row["failures"]
        if reason.endswith(" ran out of memory.")
    ]
    assert named
    found = [names.resolve(name, round_number=at, candidates=CLIENTS) for at, name in named]
    assert all(client in CLIENTS[1::2] for client in found)  # each a leaky client, resolved
    assert [client for client in CLIENTS if client in stored_text(tmp_path / "run")] == []


def test_the_coordinator_resolves_a_pseudonym_with_the_key_and_no_one_else_can(
    plain_run: Path,
) -> None:
    key_file = plain_run / PSEUDONYM_KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    names = Pseudonyms.in_folder(plain_run, run_id="pseudonymous")
    kept = participants(plain_run)
    resolved = {
        names.resolve(entry["participant"], round_number=entry["round"], candidates=CLIENTS)
        for entry in kept
    }
    assert None not in resolved and resolved <= set(CLIENTS)
    decisions = table(plain_run, "policy_decisions")
    for decision in decisions:  # the decision log names the same pseudonyms
        assert names.resolve(
            decision["client_id"], round_number=decision["round"], candidates=CLIENTS
        )
    guess = Pseudonyms(b"\x00" * 32, run_id="pseudonymous")  # a reader without the key
    assert all(
        guess.resolve(entry["participant"], round_number=entry["round"], candidates=CLIENTS) is None
        for entry in kept
    )


def test_without_pseudonyms_the_stored_records_name_clients(tmp_path: Path) -> None:
    simulate(tmp_path, "metadata.pseudonyms=false", "metadata.timestamp_granularity_s=1")
    kept = participants(tmp_path)
    assert kept and {entry["participant"] for entry in kept} <= set(CLIENTS)
    assert {row["client_id"] for row in table(tmp_path, "policy_decisions")} <= set(CLIENTS)
    assert not (tmp_path / PSEUDONYM_KEY_FILE).exists()


def test_a_key_others_can_read_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    key_file = tmp_path / PSEUDONYM_KEY_FILE
    key_file.write_bytes(b"k" * 32)
    key_file.chmod(0o644)  # whoever reads it links every round of every client
    with pytest.raises(ConfigError, match="readable by others"):
        simulate(tmp_path, "policy.enabled=false")  # no policy log asks for it first
    assert not (tmp_path / "metrics.jsonl").exists()
    assert table(tmp_path, "model_versions") == []  # not even the initial model
