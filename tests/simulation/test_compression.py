"""Compressed uploads in a simulation: the same handler as a deployed client's, what the rows
count, what the device links take, and a run that replays bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shoal.apps import builtin
from shoal.client.api import Client
from shoal.client.app import ClientApp, ClientContext
from shoal.config import Config
from shoal.core import ConfigError
from shoal.core.compression import Compression
from shoal.simulation.runner import RESIDUALS_FILE, Simulation
from support.jobs import bare_config, rows_without_wall

VALUES = 650  # the default softmax model: 64 x 10 weights and 10 biases


def job(*overrides: str) -> Config:
    base = [
        "run.rounds=4",
        "data.num_clients=20",
        "round.clients_per_round=5",
        "round.over_selection=1.0",
        "round.deadline_s=600",
        "evaluation.every=4",
        "evaluation.clients=5",
        "simulation.workers=0",
        "divergence.enabled=false",
    ]
    return bare_config([*base, *overrides])


def rows_of(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("codec", "fraction"), [("int8", 0.01), ("ternary", 0.01), ("topk", 0.05)])
def test_a_round_counts_the_bytes_its_compressed_uploads_took(
    tmp_path: Path, codec: str, fraction: float
) -> None:
    Simulation(job(), tmp_path / "dense").run()
    config = job(f"compression.kind='{codec}'", f"compression.fraction={fraction}")
    Simulation(config, tmp_path / "squeezed").run()
    dense = [row for row in rows_of(tmp_path / "dense") if row["phase"] == "fit"]
    squeezed = [row for row in rows_of(tmp_path / "squeezed") if row["phase"] == "fit"]
    payload = config.compression.codec().payload_size(VALUES)
    for plain, row in zip(dense, squeezed, strict=True):
        assert row["reported"] == plain["reported"] == 5
        if codec != "topk":  # exact: a quantizing codec's payload has one size
            assert row["bytes_up"] == 5 * payload
        assert row["bytes_up"] < plain["bytes_up"] / 3
        assert row["bytes_down"] == plain["bytes_down"]  # the model still goes down whole


def test_int8_trains_as_well_as_the_full_update(tmp_path: Path) -> None:
    dense = Simulation(job("run.rounds=8"), tmp_path / "dense").run()
    squeezed = Simulation(job("run.rounds=8", "compression.kind='int8'"), tmp_path / "int8").run()
    assert squeezed["final_accuracy"] == pytest.approx(dense["final_accuracy"], abs=0.03)


def test_a_compressed_run_replays_bit_for_bit_whatever_the_workers(tmp_path: Path) -> None:
    for codec in ("ternary", "topk"):
        options = (f"compression.kind='{codec}'", "compression.fraction=0.05")
        Simulation(job(*options), tmp_path / f"{codec}-serial").run()
        Simulation(job(*options, "simulation.workers=2"), tmp_path / f"{codec}-pool").run()
        assert rows_without_wall(tmp_path / f"{codec}-serial") == rows_without_wall(
            tmp_path / f"{codec}-pool"
        )


def test_top_k_clients_keep_what_they_left_out_for_their_next_upload(tmp_path: Path) -> None:
    """Every client in every round: each round's upload adds what the one before left out."""
    config = job(
        "data.num_clients=5",
        "run.rounds=3",
        "compression.kind='topk'",
        "compression.fraction=0.02",
    )
    simulation = Simulation(config, tmp_path)
    seen: list[dict[str, float]] = []
    simulation.run(
        on_round=lambda row: seen.append(
            {client: float(abs(r).sum()) for client, r in simulation.residuals.items()}
        )
    )
    fits = seen[:3]
    assert all(len(residuals) == 5 for residuals in fits)  # each client keeps its own
    kept = Compression("topk", 0.02).kept(VALUES)
    assert kept == 13 and all(total > 0 for total in fits[0].values())


def test_a_slow_uplink_is_less_of_a_straggler_with_compressed_uploads(tmp_path: Path) -> None:
    """A device class whose uplink takes longer than the round's deadline for a whole update
    (2.3 s), and 0.1 s for a ternary one."""
    slow = (
        "devices.classes=[{name='phone', share=1.0, examples_per_second=100000, "
        "upload_mbps=0.01, download_mbps=100, latency_s=0.0}]"
    )
    Simulation(job(slow, "round.deadline_s=2"), tmp_path / "dense").run()
    Simulation(job(slow, "round.deadline_s=2", "compression.kind='ternary'"), tmp_path / "t").run()
    dense = [row for row in rows_of(tmp_path / "dense") if row["phase"] == "fit"]
    squeezed = [row for row in rows_of(tmp_path / "t") if row["phase"] == "fit"]
    assert all(row["stragglers"] == 5 and not row["committed"] for row in dense)
    assert all(row["stragglers"] == 0 and row["committed"] for row in squeezed)


def failing_first_client(context: ClientContext) -> Client:
    """Client 0 raises on every fit: its failure report uploads no update."""
    client = builtin.client_app(context)
    if context.partition_index == 0:

        def broken(*args: object) -> Any:
            raise MemoryError("device out of memory")

        client.fit = broken  # type: ignore[method-assign]
    return client


def test_a_client_that_fails_counts_no_upload(tmp_path: Path) -> None:
    config = job("data.num_clients=5", "compression.kind='int8'", "round.quorum=0.5")
    app = ClientApp(failing_first_client, num_examples=builtin.client_app.num_examples)
    Simulation(config, tmp_path, client_app=app, server_app=builtin.server_app).run()
    fits = [row for row in rows_of(tmp_path) if row["phase"] == "fit"]
    payload = config.compression.codec().payload_size(VALUES)
    assert all(row["reported"] == 4 and row["bytes_up"] == 4 * payload for row in fits)


def test_the_config_refuses_top_k_with_clusters_and_any_codec_with_secure_sums() -> None:
    with pytest.raises(ConfigError, match="lands in the cluster it trained last"):
        job("compression.kind='topk'", "clustering.clusters=2")
    job("compression.kind='int8'", "clustering.clusters=2")  # no residual: no cluster to miss
    with pytest.raises(ConfigError, match="secure aggregation masks or encrypts the whole"):
        job("compression.kind='int8'", "secure_aggregation.protocol='secagg+'")


def test_a_resumed_top_k_run_repeats_an_uninterrupted_one(tmp_path: Path) -> None:
    options = ("compression.kind='topk'", "compression.fraction=0.05")
    Simulation(job(*options, "run.rounds=6"), tmp_path / "whole").run()
    Simulation(job(*options, "run.rounds=3"), tmp_path / "parts").run()
    Simulation(job(*options, "run.rounds=6"), tmp_path / "parts", resume=True).run()
    assert rows_without_wall(tmp_path / "parts") == rows_without_wall(tmp_path / "whole")


def test_a_resume_without_its_residuals_starts_them_at_zero_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = ("compression.kind='topk'", "compression.fraction=0.05")
    Simulation(job(*options, "run.rounds=3"), tmp_path).run()
    (tmp_path / RESIDUALS_FILE).write_bytes(b"not a zip")
    Simulation(job(*options, "run.rounds=4"), tmp_path, resume=True).run()
    assert "the top-k residuals of round 3 are not there" in caplog.text
    assert [row["round"] for row in rows_of(tmp_path) if row["phase"] == "fit"] == [1, 2, 3, 4]
