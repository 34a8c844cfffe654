"""Benchmark: one round with 1,000 concurrent network clients on 127.0.0.1, over TLS.

The coordinator runs in this process (`shoal.coordinator.server.serve`, the
same code as `shoal coordinator serve`); the clients run in ``--processes``
worker processes, each hosting many lightweight client runtimes (softmax
regression, 10 local examples) that share one gRPC channel per process.
Every client enrolls, checks in, downloads the model, trains and uploads a
signed update: the round needs all of them (over-selection 1.0).

Reported per round: seconds from the round's start to its commit, and the
coordinator's CPU seconds per client (this process's CPU time over the
round). The baseline is the same round driven through the in-process
transport (no network, no TLS, no signatures), measured in the same run.

    python benchmarks/network.py --clients 1000 --processes 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shoal.aggregation.strategy import make_strategy
from shoal.client.link import Enrollment
from shoal.client.numpy_models import NumpyClient, SoftmaxRegression
from shoal.client.runtime import Backoff, ClientRuntime
from shoal.config import load_config
from shoal.coordinator import CommitVersion, Coordinator, RoundSettings
from shoal.coordinator.driver import DriverSettings, RoundDriver
from shoal.coordinator.events import RoundSummary
from shoal.coordinator.schedule import schedule
from shoal.transport.certs import init_certificates
from shoal.transport.signing import generate_client_key

MODEL = SoftmaxRegression(num_features=64, num_classes=10)
TOKEN = "bench"


def light_client(index: int) -> NumpyClient:
    rng = np.random.default_rng(index)
    features = rng.normal(size=(10, 64)).astype(np.float32)
    labels = rng.integers(0, 10, size=10)
    return NumpyClient(MODEL, train_data=(features, labels), parameters=MODEL.init_parameters(rng))


def enrollments(start: int, count: int) -> list[Enrollment]:
    keys = [generate_client_key() for _ in range(count)]
    return [
        Enrollment(f"bench-{start + i:05d}", private, public)
        for i, (private, public) in enumerate(keys)
    ]


# --- the client processes ---------------------------------------------------------------


async def run_clients(target: str, ca: Path, start: int, count: int) -> None:
    import grpc

    from shoal.transport.certs import load_channel_credentials
    from shoal.transport.grpc_link import GrpcLink

    channel = grpc.aio.secure_channel(target, load_channel_credentials(ca))
    runtimes = [
        ClientRuntime(
            light_client(start + i),
            GrpcLink(target, credentials=None, enrollment_token=TOKEN, channel=channel),
            enrollment,
            backoff=Backoff(0.05, 2.0),
            seed=start + i,
        )
        for i, enrollment in enumerate(enrollments(start, count))
    ]
    tasks = [asyncio.create_task(runtime.run()) for runtime in runtimes]
    try:
        await asyncio.gather(*tasks)
    finally:
        await channel.close()


# --- the coordinator --------------------------------------------------------------------


def job_config(folder: Path, *, clients: int, rounds: int, port: int) -> Any:
    return load_config(
        None,
        [
            f"run.rounds={rounds}",
            f"data.num_clients={clients}",
            f"round.clients_per_round={clients}",
            "round.over_selection=1.0",
            "round.quorum=1.0",
            "round.deadline_s=120",
            "client.epochs=1",
            "client.batch_size=0",
            "evaluation.every=0",
            f'coordinator.listen="127.0.0.1:{port}"',
            f'coordinator.state_dir="{folder / "state"}"',
            f'coordinator.certificates="{folder / "certs"}"',
            f'coordinator.enrollment_tokens=[{{token="{TOKEN}", max_uses={clients}}}]',
            "coordinator.retry_after_s=1.0",
            'app.client="benchmarks.network:bench_client"',
        ],
    )


def bench_client(context: Any) -> NumpyClient:
    """The job's client app: the coordinator builds its initial model from it."""
    return light_client(0)


async def network_rounds(
    clients: int, processes: int, rounds: int, port: int
) -> list[dict[str, float]]:
    from shoal.coordinator.server import serve

    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        init_certificates(folder / "certs")
        config = job_config(folder, clients=clients, rounds=rounds, port=port)
        cpu_at_start = [time.process_time()]
        round_began = [time.perf_counter()]
        workers: list[subprocess.Popen[bytes]] = []

        def on_round(row: dict[str, Any]) -> None:
            cpu = time.process_time() - cpu_at_start[0]
            cpu_at_start[0] = time.process_time()
            now = time.perf_counter()
            results.append({
                "round": row["round"],
                "reported": row["reported"],
                "round_seconds": now - round_began[0],  # from the previous commit (or the launch)
                "coordinator_cpu_ms_per_client": 1000 * cpu / max(1, row["reported"]),
            })  # fmt: skip
            round_began[0] = now

        def on_ready(bound: int, first_round: int) -> None:
            share = -(-clients // processes)
            for start in range(0, clients, share):
                count = str(min(share, clients - start))
                ca = str(folder / "certs" / "ca.pem")
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(start),
                    count,
                    f"127.0.0.1:{bound}",
                    ca,
                ]
                workers.append(subprocess.Popen(command))
            cpu_at_start[0] = time.process_time()
            round_began[0] = time.perf_counter()

        try:
            await serve(config, on_round=on_round, on_ready=on_ready)
        finally:
            for worker in workers:
                worker.terminate()
                worker.wait()
    return results


async def in_process_rounds(clients: int, rounds: int) -> list[float]:
    """The baseline: the same round through the in-process transport."""
    from shoal.coordinator.inprocess import InProcessLink

    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=clients, over_selection=1.0, quorum=1.0, deadline_s=120
        ),
        strategy=make_strategy("fedavg"),
        parameters=MODEL.init_parameters(np.random.default_rng(0)),
        seed=0,
    )
    models = {coordinator.parameters.sha256(): coordinator.parameters}
    times: list[float] = []

    async def on_closed(summary: RoundSummary, commit: CommitVersion | None) -> None:
        if commit is not None:
            models[commit.parameters.sha256()] = commit.parameters
        times.append(summary.closed_at - summary.started_at)

    ids = [enrollment.client_id for enrollment in enrollments(0, clients)]
    driver = RoundDriver(
        coordinator,
        DriverSettings(retry_after_s=1.0),
        plays=schedule(rounds=rounds),
        candidates=lambda: ids,
        on_closed=on_closed,
    )
    link = InProcessLink(driver, models.__getitem__)
    runtimes = [
        ClientRuntime(light_client(i), link, enrollment, seed=i)
        for i, enrollment in enumerate(enrollments(0, clients))
    ]
    tasks = [asyncio.create_task(runtime.run()) for runtime in runtimes]
    await driver.run()
    for runtime in runtimes:
        runtime.stop()
    await asyncio.gather(*tasks)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=50091)
    parser.add_argument("--worker", nargs=4, metavar=("START", "COUNT", "TARGET", "CA"))
    args = parser.parse_args()
    if args.worker:
        start, count, target, ca = args.worker
        asyncio.run(run_clients(target, Path(ca), int(start), int(count)))
        return
    baseline = asyncio.run(in_process_rounds(args.clients, args.rounds))
    for row, in_process in zip(
        asyncio.run(network_rounds(args.clients, args.processes, args.rounds, args.port)),
        baseline,
        strict=False,
    ):
        row.update(
            benchmark="network_round",
            clients=args.clients,
            processes=args.processes,
            in_process_round_seconds=round(in_process, 3),
            ratio_to_in_process=round(row["round_seconds"] / in_process, 2),
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
