"""Clustered FL that starts when the drift flags, on the live coordinator over real gRPC.

The coordinator is the one ``shoal coordinator serve`` runs (in this process,
on 127.0.0.1) with the day and night devices of ``examples/day-night``; the
clients are real client runtimes, each built by the example's client app
under the job's config, as a deployed client builds it (which wraps it to
serve cluster models). The run starts with one model; once a round's drift
flags the two populations it splits, and the clients train the cluster
models from then on.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.client.api import Client
from shoal.client.app import ClientApp, ClientContext
from shoal.client.clustered import ClusteredClient
from shoal.config import Config, parse_config
from shoal.core.clusters import stacked_clusters
from shoal.registry import AuditLog, BlobStore, ModelRegistry, blob_location, registry_location
from support.jobs import network_job, serve_to_digits_clients

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "day-night"
TOKEN = "day-and-night"
RUN = "day-night-live"
CLIENTS = 8
ROUNDS = 3


@pytest.fixture
def day_night() -> Iterator[Any]:
    sys.path.insert(0, str(EXAMPLE))
    sys.modules.pop("app", None)  # another example's app.py, imported by a test before
    try:
        import app  # the example's own module

        yield app
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("app", None)


def job(tmp_path: Path) -> Config:
    return parse_config(
        network_job(
            tmp_path,
            run_id=RUN,
            token=TOKEN,
            clients=CLIENTS,
            per_round=CLIENTS,
            run={"rounds": ROUNDS, "seed": 0},
            round={"deadline_s": 60.0, "quorum": 1.0},  # no round starts before all enroll
            client={"epochs": 2, "batch_size": 16, "learning_rate": 0.2},
            app={"client": "app:client_fn"},
            clustering={"clusters": 2, "start": "flagged"},
        )
    )


def test_a_flagged_run_splits_on_the_live_coordinator_and_clients_train_the_clusters(
    tmp_path: Path, day_night: Any
) -> None:
    config = job(tmp_path)
    built: list[Client] = []

    def deployed(index: int, clients: int) -> Client:
        context = ClientContext(f"client-{index}", index, clients, config=config)
        client = ClientApp(day_night.client_fn)(context)
        built.append(client)
        return client

    rows: list[dict[str, Any]] = []
    asyncio.run(
        serve_to_digits_clients(
            tmp_path,
            config,
            clients=CLIENTS,
            token=TOKEN,
            on_round=rows.append,
            client_of=deployed,
            search_path=[EXAMPLE],
            timeout_s=110,
        )
    )
    assert all(isinstance(client, ClusteredClient) for client in built)
    fits = [row for row in rows if row["phase"] == "fit"]
    assert [row["round"] for row in fits] == list(range(1, ROUNDS + 1))
    assert all(row["committed"] for row in fits)
    splits = [row for row in fits if "clustered_split" in row]
    assert len(splits) == 1 and splits[0]["drift_bimodal"]
    split = splits[0]
    assert split["clustered_split"]["clusters"] == 2 and "cluster_sizes" not in split
    after = [row for row in fits if row["round"] > split["round"]]
    assert after, "the run split in its last round: nothing trained the clusters"
    for row in after:  # every client that counted trained one cluster model and named it
        assert sum(row["cluster_sizes"].values()) == row["reported"] == CLIENTS
    state = Path(config.coordinator.state_dir)
    database = registry_location(state, None).open()
    try:
        models = ModelRegistry(database, BlobStore(blob_location(state, None)))
        assert stacked_clusters(models.load(RUN, 0)) is None  # it started with one model
        head = models.head(RUN)
        assert head is not None and stacked_clusters(models.load(RUN, head.version)) == 2
        (entry,) = AuditLog(database, actor="test").entries(kind="clustered_split")
        assert entry.details["version"] == split["model_version"]
        assert entry.details["sizes"] == split["clustered_split"]["sizes"]
    finally:
        database.close()
