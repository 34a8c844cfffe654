"""Signed models over gRPC with TLS on 127.0.0.1: a client that pins the coordinator's key
refuses every tampered model, reports why, and trains on the honest one.

The attacker is the coordinator's own service (or a man in the middle: it
sees and rewrites the same bytes): in round 1 it serves a tampered model,
in later rounds the honest one. Each client must refuse round 1's model
(never train on it), tell the coordinator why, and train in round 2.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.client.runtime import Backoff, ClientRuntime, RunPin, load_or_create_enrollment
from shoal.config import parse_config
from shoal.coordinator.server import CoordinatorParts, build
from shoal.coordinator.service import (
    Context,
    CoordinatorService,
    ModelBytes,
    add_coordinator_service,
)
from shoal.core.errors import SecurityError
from shoal.core.parameters import Parameters
from shoal.governance.model_signing import (
    ModelSigner,
    PinnedKey,
    generate_signing_key,
    load_public_key,
)
from shoal.registry import VersionSignature
from shoal.tasks import CheckInAnswer, ModelVersion, Phase, TaskOffer
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.certs import (
    init_certificates,
    load_channel_credentials,
    load_server_credentials,
)
from shoal.transport.chunks import chunk_payload
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.messages import CheckInOutcome, ModelRef, Task
from shoal.transport.signing import generate_client_key
from support.jobs import digits_client, network_job

RUN = "signed-run"
TOKEN = "let-me-in"
CLIENTS = 2

FORGER = ModelSigner(generate_signing_key(), run_id=RUN)  # the attacker's own key

Served = tuple[ModelRef, bytes]
Tamper = Callable[[ModelRef, bytes, ModelSigner], Served]


def _reversion(ref: ModelRef, **changes: Any) -> ModelRef:
    assert ref.version is not None
    return dataclasses.replace(ref, version=dataclasses.replace(ref.version, **changes))


def weights_changed(ref: ModelRef, data: bytes, signer: ModelSigner) -> Served:
    """Other weights, under their own sha256, with the honest version's signature."""
    honest = Parameters.from_bytes(data)
    tampered = honest.with_vector(honest.vector + 0.5)
    sha = tampered.sha256()
    payload = tampered.to_bytes()
    return dataclasses.replace(ref, version_id=sha, sha256=sha, size_bytes=len(payload)), payload


def weights_under_the_honest_hash(ref: ModelRef, data: bytes, signer: ModelSigner) -> Served:
    """Other weights sent as the honest sha256 (the download's own check catches them)."""
    honest = Parameters.from_bytes(data)
    return ref, honest.with_vector(honest.vector + 1.0).to_bytes()


def version_swapped(ref: ModelRef, data: bytes, signer: ModelSigner) -> Served:
    assert ref.version is not None
    return _reversion(ref, version=ref.version.version + 1), data


def round_swapped(ref: ModelRef, data: bytes, signer: ModelSigner) -> Served:
    assert ref.version is not None
    return _reversion(ref, round=ref.version.round + 3), data


def run_swapped(ref: ModelRef, data: bytes, signer: ModelSigner) -> Served:
    """The honest key's signature on this very version, made for another run."""
    assert ref.version is not None
    other = ModelSigner(signer.private_key, run_id="another-run")
    signed = other(
        name=ref.version.name,
        version=ref.version.version,
        round=ref.version.round,
        sha256=ref.sha256,
    )
    return _reversion(ref, signed=signed), data


def another_key(ref: ModelRef, data: bytes, signer: ModelSigner) -> Served:
    """A valid signature over the right facts, by a key that is not the pinned one."""
    assert ref.version is not None
    signed = FORGER(
        name=ref.version.name,
        version=ref.version.version,
        round=ref.version.round,
        sha256=ref.sha256,
    )
    return _reversion(ref, signed=signed), data


def another_key_claiming_the_pinned_id(ref: ModelRef, data: bytes, signer: ModelSigner) -> Served:
    forged, _ = another_key(ref, data, signer)
    assert forged.version is not None and forged.version.signed is not None
    claimed = VersionSignature(RUN, signer.key_id, forged.version.signed.signature)
    return _reversion(ref, signed=claimed), data


ANOTHER_RUN = "another-run"


def another_runs_version(ref: ModelRef, data: bytes, signer: ModelSigner) -> Served:
    """A version the pinned key signed for another run (the deployment's key signs every run),
    served as a task of that run: its signature verifies."""
    honest = Parameters.from_bytes(data)
    theirs = honest.with_vector(honest.vector - 0.25)
    payload = theirs.to_bytes()
    sha = theirs.sha256()
    signed = ModelSigner(signer.private_key, run_id=ANOTHER_RUN)(
        name=RUN, version=7, round=6, sha256=sha
    )
    assert ref.version is not None
    version = dataclasses.replace(ref.version, version=7, round=6, signed=signed)
    return ModelRef(sha, sha, len(payload), version), payload


def signature_missing(ref: ModelRef, data: bytes, signer: ModelSigner) -> Served:
    return _reversion(ref, signed=None), data


def no_version_named(ref: ModelRef, data: bytes, signer: ModelSigner) -> Served:
    return dataclasses.replace(ref, version=None), data


class TamperingService(CoordinatorService):
    """A coordinator that serves a tampered model in round 1 and the honest one after."""

    def __init__(self, parts: CoordinatorParts, tamper: Tamper) -> None:
        honest = parts.service
        super().__init__(parts.driver, parts.clients, honest.settings, versions=parts.records.head)
        assert parts.records.signer is not None
        self.signer = parts.records.signer
        self.tamper = tamper
        self.served: dict[str, bytes] = {}  # the tampered payloads, by the sha256 they claim
        self.tampered_sha256: set[str] = set()

    def _task_or_retry(self, answer: CheckInAnswer) -> CheckInOutcome:
        outcome = super()._task_or_retry(answer)
        if not isinstance(outcome, Task) or outcome.round != 1:
            if isinstance(outcome, Task):
                self.served.clear()  # round 1 is over: the honest model from now on
            return outcome
        _, data = self.model_bytes.current()
        model, payload = self.tamper(outcome.model, data, self.signer)
        self.served[model.sha256] = payload
        if payload != data:
            self.tampered_sha256.add(Parameters.from_bytes(payload).sha256())
        if self.tamper is another_runs_version:  # the task's run too
            return dataclasses.replace(outcome, model=model, run_id=ANOTHER_RUN)
        return dataclasses.replace(outcome, model=model)

    async def FetchModel(  # noqa: N802
        self, request: bytes, context: Context
    ) -> AsyncIterator[pb.Chunk]:
        wanted = serde.parse(pb.FetchModelRequest, request).version_id
        payload = self.served.get(wanted)
        if payload is not None and payload != self.model_bytes.current()[1]:
            for chunk in chunk_payload(payload):
                yield serde.encode_chunk(chunk)
            return
        async for chunk in super().FetchModel(request, context):
            yield chunk


class Watched(Client):
    """A digits client that records the sha256 of every model it is asked to train."""

    def __init__(self, inner: Client, trained: list[str]) -> None:
        self.inner = inner
        self.trained = trained

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        self.trained.append(parameters.sha256())
        return self.inner.fit(parameters, config)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return self.inner.evaluate(parameters, config)


async def _serve_and_train(
    tmp_path: Path, tamper: Tamper | None, *, deadline_s: float = 30.0
) -> tuple[list[dict[str, Any]], list[str], set[str]]:
    certificates = init_certificates(tmp_path / "certs")
    sections = network_job(
        tmp_path,
        run_id=RUN,
        token=TOKEN,
        clients=CLIENTS,
        per_round=CLIENTS,
        run={"name": RUN, "rounds": 2},
        round={"quorum": 1.0, "deadline_s": deadline_s},
    )
    sections["coordinator"]["certificates"] = str(tmp_path / "certs")
    config = parse_config(sections)
    rows: list[dict[str, Any]] = []
    parts = build(config, on_round=rows.append)
    service = parts.service if tamper is None else TamperingService(parts, tamper)
    server = grpc.aio.server()
    add_coordinator_service(service, server)
    port = server.add_secure_port("127.0.0.1:0", load_server_credentials(certificates.server))
    await server.start()
    pinned = load_public_key(certificates.signing_public_key)
    credentials = load_channel_credentials(certificates.ca.certificate)
    trained: list[str] = []
    links = [
        GrpcLink(f"127.0.0.1:{port}", credentials=credentials, enrollment_token=TOKEN)
        for _ in range(CLIENTS)
    ]
    runtimes = [
        ClientRuntime(
            Watched(digits_client(index, CLIENTS), trained),
            link,
            load_or_create_enrollment(tmp_path / f"client-{index}", generate_client_key),
            backoff=Backoff(0.01, 0.1),
            seed=index,
            coordinator_key=pinned,
            trains_for=RunPin(RUN, RUN),  # its job's, as `shoal client run --config` pins
            unreadable_retry_s=0.2,  # a task refused and offered again: the wait before the next
        )
        for index, link in enumerate(links)
    ]
    tasks = [asyncio.create_task(runtime.run()) for runtime in runtimes]
    try:
        await asyncio.wait_for(parts.driver.run(), timeout=90)
    finally:
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks)
        for link in links:
            await link.close()
        await server.stop(None)
        parts.close()
    tampered = set() if not isinstance(service, TamperingService) else service.tampered_sha256
    return rows, trained, tampered


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (weights_changed, "does not match its signature"),
        (weights_under_the_honest_hash, "hashes to"),
        (version_swapped, "does not match its signature"),
        (round_swapped, "does not match its signature"),
        (run_swapped, "does not match its signature"),
        (another_key, "not by the pinned key"),
        (another_key_claiming_the_pinned_id, "does not match its signature"),
        (signature_missing, "is not signed"),
        (no_version_named, "no signed model version"),
    ],
)
def test_a_client_refuses_a_tampered_model_says_why_and_trains_on_the_honest_one(
    tmp_path: Path, tamper: Tamper, reason: str
) -> None:
    rows, trained, tampered = asyncio.run(_serve_and_train(tmp_path, tamper))
    fits = {row["round"]: row for row in rows if row["phase"] == "fit"}
    refused = fits[1]
    assert not refused["committed"]  # nobody trained on round 1's model
    assert refused["reported"] == 0
    [(failure, count)] = refused["failures"].items()
    assert failure.startswith("model refused:") and reason in failure
    assert count == CLIENTS  # every client told the coordinator why
    assert fits[2]["committed"] and fits[2]["reported"] == CLIENTS  # the honest model
    assert len(trained) == CLIENTS and not set(trained) & tampered


def test_a_client_refuses_a_version_its_key_signed_for_another_run(tmp_path: Path) -> None:
    """The deployment's key signs every run's versions: a man in the middle served one of
    another run, as a task of that run, and the pinned clients trained on it (the coordinator
    then refused their updates, for the wrong run)."""
    rows, trained, tampered = asyncio.run(
        _serve_and_train(tmp_path, another_runs_version, deadline_s=4.0)
    )
    fits = {row["round"]: row for row in rows if row["phase"] == "fit"}
    assert not fits[1]["committed"] and fits[1]["reported"] == 0
    assert fits[2]["committed"] and fits[2]["reported"] == CLIENTS  # the honest model
    assert len(trained) == CLIENTS and not set(trained) & tampered


def test_a_client_without_its_jobs_run_keeps_the_first_signed_tasks_run() -> None:
    runtime = ClientRuntime(Watched(digits_client(0, 2), []), None, None)  # type: ignore[arg-type]
    signer = ModelSigner(generate_signing_key(), run_id=RUN)
    runtime.coordinator_key = PinnedKey.of(signer.private_key.public_key())

    def offer(run_id: str, name: str) -> TaskOffer:
        signed = ModelSigner(signer.private_key, run_id=run_id)(
            name=name, version=1, round=1, sha256="ab" * 32
        )
        version = ModelVersion(name, 1, 1, signed)
        return TaskOffer(1, Phase.FIT, FitConfig(1), "ab" * 32, 60.0, model=version)

    runtime._verify(offer(RUN, RUN))
    assert runtime.trains_for == RunPin(RUN, RUN)
    runtime._verify(offer(RUN, RUN))
    for run_id, name in [(ANOTHER_RUN, RUN), (RUN, "another-model")]:
        with pytest.raises(SecurityError, match=f"this client trains '{RUN}' of run '{RUN}'"):
            runtime._verify(offer(run_id, name))


def test_an_honest_coordinator_serves_signed_versions_the_pinned_clients_train_on(
    tmp_path: Path,
) -> None:
    rows, trained, _ = asyncio.run(_serve_and_train(tmp_path, None))
    assert [row["committed"] for row in rows] == [True, True]
    assert len(trained) == 2 * CLIENTS


def test_a_version_is_signed_once_and_its_reference_read_once_per_version(
    tmp_path: Path,
) -> None:
    """The download path stays fast: no signing and no registry read per check-in."""
    sections = network_job(tmp_path, run_id=RUN, token=TOKEN, clients=2, per_round=2)
    parts = build(parse_config(sections))
    try:
        reads: list[int] = []

        def head() -> Any:
            reads.append(1)
            return parts.records.head()

        served = ModelBytes(parts.driver, head)
        references = {served.reference() for _ in range(100)}
        assert len(references) == 1 and len(reads) == 1
        [reference] = references
        assert reference is not None and reference.version is not None
        assert reference.version.signed == parts.records.head().signed  # type: ignore[union-attr]
        pinned = load_public_key(tmp_path / "state" / "model-signing.pub")
        pinned.verify(
            reference.version.signed,
            name=RUN,
            version=0,
            round=0,
            sha256=Parameters.from_bytes(served.current()[1]).sha256(),
        )
    finally:
        parts.close()
