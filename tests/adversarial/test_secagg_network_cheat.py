"""A dishonest client over real gRPC: it alters a share it reveals, is named, and is suspended.

Five clients serve a two-round SecAgg+ job on 127.0.0.1. In round 1 one of
them adds 1 to one limb of a share it reveals, and two honest ones vanish
before the unmask stage, so that every share left is needed: the server
sets the altered share aside (it misses its dealer's digest), cannot rebuild
the masks without it, and aborts the round naming the cheat; nothing is
committed. The run layer suspends the cheat in the registry, with what it
did, and round 2 sums the four honest clients exactly.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.client import runtime
from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import parse_config
from shoal.coordinator.server import serve
from shoal.core import DeviceState, Parameters, SecurityError
from shoal.governance.pseudonyms import Pseudonyms
from shoal.registry import (
    BlobStore,
    ClientRegistry,
    ClientStatus,
    ModelRegistry,
    blob_location,
    registry_location,
)
from shoal.secure.client import Contribution, SecAggClient
from shoal.secure.consistency import IdentityKey
from shoal.secure.loopback import altered_reveal
from shoal.secure.messages import ClientMessage, ServerRequest, UnmaskRequest
from shoal.transport.signing import generate_client_key
from support.jobs import digits_client, network_job
from support.links import RecordingLink, Upload

pytestmark = pytest.mark.timeout(120)

TOKEN, RUN, CLIENTS = "cheat-token", "run-cheat", 5
CHEAT, VANISHING = "site-0", {"site-3", "site-4"}


class FixedUpdate(Client):
    def __init__(self, template: Parameters, update: np.ndarray, num_examples: int) -> None:
        self.template, self.update, self.num_examples = template, update, num_examples

    def get_parameters(self) -> Parameters:
        return self.template

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        return FitResult([self.update], self.num_examples, {"loss": 0.5}, is_update=True)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return EvaluateResult(0.5, self.num_examples)


def sessions(identities: dict[bytes, str]) -> Any:
    """The SecAggClient factory the runtimes use: the cheat cheats, two vanish in round 1."""

    class Cheating(SecAggClient):
        def handle(
            self, request: ServerRequest, contribution: Contribution | None = None
        ) -> ClientMessage:
            return altered_reveal(super().handle(request, contribution), node=self.node)

    class VanishingOnce(SecAggClient):
        def handle(
            self, request: ServerRequest, contribution: Contribution | None = None
        ) -> ClientMessage:
            if isinstance(request, UnmaskRequest) and request.round == 1:
                raise SecurityError("gone before the unmask stage")
            return super().handle(request, contribution)

    def make(*, round: int, identity: IdentityKey) -> SecAggClient:
        name = identities[identity.public]
        kind = Cheating if name == CHEAT else VanishingOnce if name in VANISHING else SecAggClient
        return kind(round=round, identity=identity)

    return make


def test_a_client_that_alters_a_revealed_share_is_named_and_suspended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sections = network_job(
        tmp_path,
        run_id=RUN,
        token=TOKEN,
        clients=CLIENTS,
        per_round=CLIENTS,
        run={"rounds": 2, "seed": 1},
        round={"quorum": 0.6, "deadline_s": 20},
        secure_aggregation={"protocol": "secagg+", "clip": 1.0, "unmask_s": 20},
    )
    config = parse_config(sections)
    template = digits_client(0, CLIENTS).get_parameters()
    rng = np.random.default_rng(5)
    plain = {
        f"site-{i}": (rng.uniform(-0.5, 0.5, len(template)).astype(np.float32), 10 + 7 * i)
        for i in range(CLIENTS)
    }
    enrollments = {
        name: load_or_create_enrollment(tmp_path / name, generate_client_key, client_id=name)
        for name in plain
    }
    identities = {e.public_key: name for name, e in enrollments.items()}
    database = registry_location(tmp_path / "state", None).open()
    try:  # enrolled before the coordinator starts: round 1 selects all five
        for name, enrollment in enrollments.items():
            ClientRegistry(database).enroll(name, DeviceState(), public_key=enrollment.public_key)
    finally:
        database.close()
    monkeypatch.setattr(runtime, "SecAggClient", sessions(identities))
    rows: list[dict[str, Any]] = []
    uploads: list[Upload] = []

    async def scenario() -> None:
        runtimes, tasks, links = [], [], []

        def on_ready(port: int, first_round: int) -> None:
            for name, (update, examples) in plain.items():
                link = RecordingLink(f"127.0.0.1:{port}", uploads, enrollment_token=TOKEN)
                client = FixedUpdate(template, update, examples)
                worker = ClientRuntime(client, link, enrollments[name], backoff=Backoff(0.01, 0.1))
                links.append(link)
                runtimes.append(worker)
                tasks.append(asyncio.create_task(worker.run()))

        try:
            await asyncio.wait_for(
                serve(config, insecure=True, on_round=rows.append, on_ready=on_ready), timeout=90
            )
        finally:
            for worker in runtimes:
                worker.stop()
            await asyncio.gather(*tasks)
            for link in links:
                await link.close()

    asyncio.run(scenario())
    assert uploads == []  # only masked inputs left the devices
    first, second = [row for row in rows if row["phase"] == "fit"]
    assert first["secure_aborted"] and not first["committed"]
    state = tmp_path / "state"
    # the row names the cheat under its round's pseudonym, which only the state's key resolves
    [culprit] = first["secure_culprits"]
    names = Pseudonyms.in_folder(state, run_id=RUN)
    assert names.resolve(culprit, round_number=1, candidates=plain) == CHEAT, first
    assert CHEAT not in json.dumps(first)
    assert second["committed"] and second["secure_culprits"] == []
    assert second["selected"] == CLIENTS - 1  # the cheat is no longer selected

    database = registry_location(state, None).open()
    try:
        record = ClientRegistry(database).get(CHEAT)
        assert record.status is ClientStatus.SUSPENDED
        assert "caught cheating in secure round 1" in (record.status_reason or "")
        models = ModelRegistry(database, BlobStore(blob_location(state, None)))
        head = models.head(RUN)
        assert head is not None and head.round == 2
        model = models.load(RUN, head.version)
    finally:
        database.close()
    honest = [plain[name] for name in sorted(plain) if name != CHEAT]
    weights = np.array([examples for _, examples in honest], dtype=np.float64)
    mean = sum(n * u.astype(np.float64) for u, n in honest) / weights.sum()
    expected = template.vector.astype(np.float64) + mean
    assert np.max(np.abs(model.vector - expected)) < 1e-4  # exact up to quantization
    summary = (
        json.loads((state / "summary.json").read_text())
        if (state / "summary.json").exists()
        else {}
    )
    assert summary.get("rounds_completed", 1) == 1
