"""A coordinator job for tests that serve it on 127.0.0.1 to in-process digits clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from shoal.apps import client_app
from shoal.client.api import Client
from shoal.client.app import ClientContext
from shoal.client.features import FeatureSource
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import Config, apply_overrides, parse_config
from shoal.coordinator.server import CoordinatorParts, serve
from shoal.governance.model_signing import PUBLIC_KEY_FILE, load_public_key
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.signing import generate_client_key


def network_job(
    tmp_path: Path,
    *,
    run_id: str,
    token: str,
    clients: int,
    per_round: int,
    **sections: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """The job's sections: digits, FedAvg, fast retries; ``sections`` are merged over them."""
    base: dict[str, dict[str, Any]] = {
        "run": {"name": run_id},  # the coordinator's model is named by the run
        "data": {"num_clients": clients},
        "round": {"clients_per_round": per_round, "over_selection": 1.0},
        "client": {"epochs": 1, "batch_size": 16, "learning_rate": 0.2},
        "evaluation": {"every": 0},
        "coordinator": {
            "listen": "127.0.0.1:0",
            "run_id": run_id,
            "state_dir": str(tmp_path / "state"),
            "enrollment_tokens": [token],
            "retry_after_s": 0.05,
            "grace_s": 0,
            "linger_s": 0,
        },
    }
    for name, section in sections.items():
        base[name] = base.get(name, {}) | section
    return base


def digits_client(index: int, clients: int) -> Client:
    """Client ``index`` of ``clients`` of the built-in app on digits, an IID split."""
    config = bare_config(
        [
            f"data.num_clients={clients}",
            f"round.clients_per_round={min(clients, 10)}",
            "data.partition='iid'",
        ],
    )
    context = ClientContext(
        client_id=f"client-{index}", partition_index=index, num_partitions=clients, config=config
    )
    return client_app(context)


def rows_without_wall(folder: Path) -> list[dict[str, Any]]:
    """A run folder's ``metrics.jsonl`` rows without their wall time: what a deterministic run
    repeats bit for bit, however fast it went."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("wall_time_s")
    return rows


def bare_config(overrides: Iterable[str] = ()) -> Config:
    """Every section's defaults (not the embedded default job) with ``overrides``."""
    return parse_config(apply_overrides({}, overrides))


async def serve_to_digits_clients(
    tmp_path: Path,
    config: Config,
    *,
    clients: int,
    token: str,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_ready: Callable[[int], None] | None = None,
    wrap: Callable[[Client], Client] | None = None,
    timeout_s: float = 90,
    client_of: Callable[[int, int], Client | FeatureSource] = digits_client,
    search_path: Sequence[str | Path] = (),
    link_of: Callable[[int, str], GrpcLink] | None = None,
    pin_key: bool = False,
    runtimes_out: list[ClientRuntime] | None = None,
) -> CoordinatorParts:
    """Serve ``config`` in this process (plaintext gRPC on 127.0.0.1) to ``clients`` digits
    clients, each a :class:`ClientRuntime` over a real channel, until the job ends.

    ``on_ready`` gets the coordinator's port once it listens, after the clients started;
    ``wrap`` changes each digits client (one that fails on cue...); ``client_of`` makes
    client ``index`` of ``clients`` (another app's, or a :class:`FeatureSource` that builds it
    once the run's feature module is fetched); ``search_path``: where the job's apps are;
    ``link_of`` makes client ``index``'s link to an address (one that records, or tampers);
    ``pin_key``: every client pins the coordinator's model-signing key; ``runtimes_out`` gets
    the runtimes.
    """
    runtimes: list[ClientRuntime] = [] if runtimes_out is None else runtimes_out
    links: list[GrpcLink] = []
    tasks: list[asyncio.Task[None]] = []

    def started(port: int, first_round: int) -> None:
        for index in range(clients):
            address = f"127.0.0.1:{port}"
            link = (
                GrpcLink(address, credentials=None, enrollment_token=token)
                if link_of is None
                else link_of(index, address)
            )
            enrollment = load_or_create_enrollment(tmp_path / f"c{index}", generate_client_key)
            client = client_of(index, clients)
            if wrap is not None and isinstance(client, Client):
                client = wrap(client)
            runtime = ClientRuntime(
                client,
                link,
                enrollment,
                backoff=Backoff(0.01, 0.1),
                seed=index,
                coordinator_key=(
                    load_public_key(Path(config.coordinator.state_dir) / PUBLIC_KEY_FILE)
                    if pin_key
                    else None
                ),
            )
            links.append(link)
            runtimes.append(runtime)
            tasks.append(asyncio.create_task(runtime.run()))
        if on_ready is not None:
            on_ready(port)

    try:
        return await asyncio.wait_for(
            serve(
                config,
                insecure=True,
                on_round=on_round,
                on_ready=started,
                search_path=search_path,
            ),
            timeout_s,
        )
    finally:
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks)
        for link in links:
            await link.close()
