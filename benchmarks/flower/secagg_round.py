"""Times rounds of Flower's own SecAgg+ (its workflow and its client mod); runs in Flower's venv.

This script imports Flower, never Shoal: Flower 1.42 pins protobuf 6 and
Ray 2.55, Shoal protobuf 7 and Ray 2.60, so ``benchmarks/secagg.py`` runs it
as a subprocess with the interpreter of a separate virtual environment and
reads the one JSON object it prints.

What runs is Flower's real protocol, unmodified: ``SecAggPlusWorkflow`` on
the server side, and on every client a ``ClientApp`` with ``secaggplus_mod``
around a ``NumPyClient`` whose ``fit`` returns a ready update (as Shoal's
benchmark gives each client a ready contribution). Every client and the
server live in this one process, as in Shoal's loopback: the grid below
hands each message to its client by a function call, through Flower's
protobuf codec both ways (what a wire would carry, and the copy a client
needs, since the workflow shares one record between several messages). No
Ray actors and none of the simulation engine's 0.1 s polling intervals are
on the path, so the time is Flower's protocol compute and message codec:
the fairest figure for Flower, not the slowest.

``--engine simulation`` runs the same workflow and mod in Flower's own
simulation engine instead (``run_simulation``, Ray actors, its in-memory
link state): a round there also waits on the engine's polling (0.1 s per
pull) and moves messages between processes. That is how a Flower user runs
a simulation, so it is reported beside the direct figure, never in place
of it.

``--shares`` is Flower's ``num_shares``, which counts the client itself:
7 shares is 6 neighbours. The reconstruction threshold is Shoal's rule,
more than half of the shares.

    .bench/flower-venv/bin/python benchmarks/flower/secagg_round.py --clients 20 --shares 7
    .bench/flower-venv/bin/python benchmarks/flower/secagg_round.py --engine simulation
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

import flwr
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1


class ReadyClient(NumPyClient):  # type: ignore[misc]
    """A client whose training is done: ``fit`` returns its update and example count."""

    def __init__(self, update: np.ndarray, num_examples: int) -> None:
        self.update, self.num_examples = update, num_examples

    def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        return [self.update], self.num_examples, {}


class DirectGrid(Grid):  # type: ignore[misc]
    """A grid that delivers each message to its node's ClientApp at once, through the codec."""

    def __init__(self, nodes: dict[int, tuple[ClientApp, Context]]) -> None:
        self.nodes = nodes
        self._run = Run.create_empty(RUN_ID)
        self.codec_seconds = 0.0
        self.bytes_down = dict.fromkeys(nodes, 0)  # what each client received
        self.bytes_up = dict.fromkeys(nodes, 0)  # what each client sent

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("this grid only sends and receives at once")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("this grid only sends and receives at once")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            delivered, size = self._wire(message)
            self.bytes_down[node] += size
            app, context = self.nodes[node]
            reply, size = self._wire(app(message=delivered, context=context))
            self.bytes_up[node] += size
            replies.append(reply)
        return replies

    def _wire(self, message: Message) -> tuple[Message, int]:
        began = time.perf_counter()
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        encoded = message_to_proto(message).SerializeToString()
        decoded = message_from_proto(ProtoMessage.FromString(encoded))
        self.codec_seconds += time.perf_counter() - began
        return decoded, len(encoded)


def ready_client_fn(update: np.ndarray, num_examples: int) -> Any:
    def client_fn(context: Context) -> Any:
        return ReadyClient(update, num_examples).to_client()

    return client_fn


def build(args: argparse.Namespace, seed: int) -> tuple[DirectGrid, LegacyContext, np.ndarray]:
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0, 0.1, args.params).astype(np.float32) for _ in range(args.clients)]
    examples = [int(rng.integers(10, 500)) for _ in range(args.clients)]
    nodes: dict[int, tuple[ClientApp, Context]] = {}
    for index, (update, count) in enumerate(zip(updates, examples, strict=True)):
        node = 1_000 + index
        app = ClientApp(client_fn=ready_client_fn(update, count), mods=[secaggplus_mod])
        nodes[node] = (app, Context(RUN_ID, node, {"partition-id": index}, RecordDict(), {}))
    grid = DirectGrid(nodes)
    initial = ndarrays_to_parameters([np.zeros(args.params, dtype=np.float32)])
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.clients,
        min_available_clients=args.clients,
        initial_parameters=initial,
    )
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=RUN_ID))
    context = LegacyContext(
        Context(RUN_ID, 0, {}, RecordDict(), {}), strategy=strategy, client_manager=manager
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        initial, keep_input=True
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 0})
    weights = np.array(examples, dtype=np.float64)
    expected = np.average(np.stack(updates).astype(np.float64), axis=0, weights=weights)
    return grid, context, expected


def one_round(args: argparse.Namespace, seed: int) -> dict[str, float]:
    grid, context, expected = build(args, seed)
    threshold = args.shares // 2 + 1  # Shoal's rule: more than half of the shares
    workflow = SecAggPlusWorkflow(num_shares=args.shares, reconstruction_threshold=threshold)
    context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND] = 1
    began = time.perf_counter()
    workflow(grid, context)
    round_s = time.perf_counter() - began
    result = compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
    )
    (aggregate,) = parameters_to_ndarrays(result)
    return {
        "round_s": round_s,
        "codec_s": grid.codec_seconds,
        "bytes_sent": float(np.mean(list(grid.bytes_up.values()))),
        "bytes_received": float(np.mean(list(grid.bytes_down.values()))),
        "max_error": float(np.max(np.abs(aggregate - expected))),
    }


def simulated_rounds(args: argparse.Namespace) -> list[float]:
    """Seconds of each round in Flower's simulation engine (the first, a warm-up, left out)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    timings: list[float] = []
    server_app = ServerApp()

    @server_app.main()  # type: ignore[untyped-decorator]
    def _main(grid: Grid, context: Context) -> None:
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < args.clients:  # the engine registers its nodes as it starts
            time.sleep(0.05)
            nodes = sorted(grid.get_node_ids())
        initial = ndarrays_to_parameters([np.zeros(args.params, dtype=np.float32)])
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=args.clients,
            min_available_clients=args.clients,
            initial_parameters=initial,
        )
        manager = SimpleClientManager()
        for node in nodes:
            manager.register(GridClientProxy(node_id=node, grid=grid, run_id=grid.run.run_id))
        legacy = LegacyContext(context, strategy=strategy, client_manager=manager)
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            initial, keep_input=True
        )
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 0})
        workflow = SecAggPlusWorkflow(
            num_shares=args.shares, reconstruction_threshold=args.shares // 2 + 1
        )
        for number in range(args.repeats + 1):
            legacy.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND] = number + 1
            began = time.perf_counter()
            workflow(grid, legacy)
            timings.append(time.perf_counter() - began)

    def client_fn(context: Context) -> Any:
        index = int(context.node_config["partition-id"])
        rng = np.random.default_rng([0, index])
        update = rng.normal(0, 0.1, args.params).astype(np.float32)
        return ReadyClient(update, int(rng.integers(10, 500))).to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.clients,
        # an actor per core: the clients run in parallel, which favours Flower
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        verbose_logging=bool(os.environ.get("FLOWER_VERBOSE")),
    )
    return timings[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--shares", type=int, default=7, help="Flower's num_shares (self included)")
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", choices=("direct", "simulation"), default="direct")
    args = parser.parse_args()
    if not 3 <= args.shares <= args.clients:
        parser.error("--shares must lie between 3 and --clients")
    if not os.environ.get("FLOWER_VERBOSE"):
        logging.getLogger("flwr").setLevel(logging.WARNING)
    report: dict[str, Any] = {
        "flower_version": flwr.__version__,
        "engine": args.engine,
        "clients": args.clients,
        "shares": args.shares,
        "neighbours": args.shares - 1 if args.shares < args.clients else args.clients - 1,
        "threshold": args.shares // 2 + 1,
        "params": args.params,
        "repeats": args.repeats,
    }
    if args.engine == "simulation":
        timings = simulated_rounds(args)
        report |= {"rounds_s": [round(t, 6) for t in timings], "round_s": min(timings)}
    else:
        # the identity Flower's own legacy server entry point gives a server app in one process
        TaskIdentity.task_id, TaskIdentity.run_id = 1, RUN_ID
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        one_round(argparse.Namespace(**{**vars(args), "clients": 3, "shares": 3, "params": 10}), 99)
        runs = [one_round(args, seed) for seed in range(args.repeats)]
        best = min(runs, key=lambda run: run["round_s"])
        report["rounds_s"] = [round(run["round_s"], 6) for run in runs]
        report |= {key: round(value, 6) for key, value in best.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
