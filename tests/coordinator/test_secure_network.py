"""SecAgg+ over real gRPC on 127.0.0.1: a secure round with a stalled client, refusals, setup."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.client.link import Enrollment
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import Config, parse_config
from shoal.coordinator import CommitVersion, Coordinator, RoundSettings
from shoal.coordinator.driver import DriverSettings, RoundDriver
from shoal.coordinator.schedule import schedule
from shoal.coordinator.secure import SecureSettings, enrolled_identities
from shoal.coordinator.server import build
from shoal.coordinator.service import (
    CoordinatorService,
    ServiceSettings,
    add_coordinator_service,
)
from shoal.core import ClientError, ConfigError, Parameters
from shoal.registry import ClientRegistry, ClientStatus, open_database
from shoal.secure.messages import (
    Advertisement,
    ClientMessage,
    KeysAdvertised,
    PublicKeys,
    UnmaskRequest,
)
from shoal.secure.quantization import Quantization
from shoal.secure.serde import encode_message
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport._generated import coordinator_pb2_grpc as pb_grpc
from shoal.transport.certs import (
    init_certificates,
    load_channel_credentials,
    load_server_credentials,
)
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.messages import RejectCode, SecureMessageHeader
from shoal.transport.signing import generate_client_key
from support.driving import closing

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")
TOKEN = "secure-token"
RUN = "run-secure"
SIZE = 40
CLIENTS = 6
MASKED_INPUT_S = 2.0  # the round's deadline: the stage the stalled client never answers
QUANTIZATION = Quantization(clip=1.0)


class FixedUpdate(Client):
    """A client whose training always yields the same update and example count."""

    def __init__(self, update: np.ndarray, num_examples: int) -> None:
        self.update = update
        self.num_examples = num_examples

    def get_parameters(self) -> Parameters:
        return Parameters.from_arrays([np.zeros(SIZE, np.float32)])

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        return FitResult([self.update], self.num_examples, {"loss": 0.5}, is_update=True)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return EvaluateResult(0.5, self.num_examples)


class Stalling(FixedUpdate):
    """Answers the key stages, then trains until released: it never sends its masked input."""

    def __init__(self, update: np.ndarray, num_examples: int) -> None:
        super().__init__(update, num_examples)
        self.training = threading.Event()
        self.release = threading.Event()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        self.training.set()
        self.release.wait(timeout=60)
        raise ClientError("stalled until the end of the test")


@dataclass
class Deployment:
    target: str
    credentials: grpc.ChannelCredentials
    driver: RoundDriver


async def with_secure_coordinator(
    tmp_path: Path, body: Callable[[Deployment], Awaitable[T]]
) -> tuple[T, list[CommitVersion]]:
    """Run ``body`` against a secure coordinator of one round; returns its result and commits."""
    certificates = init_certificates(tmp_path / "certs")
    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=CLIENTS, over_selection=1.0, quorum=0.5, deadline_s=MASKED_INPUT_S
        ),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.zeros(SIZE, np.float32)]),
        seed=0,
        secure=SecureSettings(run_id=RUN, quantization=QUANTIZATION),
    )
    database = open_database(None, folder=tmp_path / "registry")
    clients = ClientRegistry(database)
    commits: list[CommitVersion] = []

    async def persist(commit: CommitVersion) -> None:
        commits.append(commit)

    def candidates() -> list[str]:
        active = [r.client_id for r in clients.list(status=ClientStatus.ACTIVE, limit=1000)]
        return active if len(active) >= CLIENTS else []  # the whole federation, or no round

    driver = RoundDriver(
        coordinator,
        DriverSettings(retry_after_s=0.5),
        plays=schedule(rounds=1),  # between stages: 0.25 s
        candidates=candidates,
        on_closed=closing(persist),
        identities=enrolled_identities(clients),
    )
    service = CoordinatorService(
        driver, clients, ServiceSettings(run_id=RUN, enrollment_tokens=frozenset({TOKEN}))
    )
    server = grpc.aio.server()
    add_coordinator_service(service, server)
    port = server.add_secure_port("127.0.0.1:0", load_server_credentials(certificates.server))
    await server.start()
    credentials = load_channel_credentials(certificates.ca.certificate)
    try:
        result = await body(Deployment(f"127.0.0.1:{port}", credentials, driver))
        return result, commits
    finally:
        await server.stop(None)
        database.close()


def contributions() -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(7)
    return [
        (rng.uniform(-0.5, 0.5, SIZE).astype(np.float32), int(rng.integers(5, 50)))
        for _ in range(CLIENTS)
    ]


# --- raw requests, signed like the link signs them -----------------------------------------


def secure_parts(
    enrollment: Enrollment,
    message: ClientMessage,
    *,
    frame: bytes | None = None,
    size: int | None = None,
) -> list[pb.SecureMessagePart]:
    frame = encode_message(message) if frame is None else frame
    digest = hashlib.sha256(frame).hexdigest()
    header = serde.encode_secure_message_header(
        SecureMessageHeader(message.round, RUN, digest, len(frame) if size is None else size)
    )
    serde.sign_message(
        header,
        enrollment.private_key,
        client_id=enrollment.client_id,
        run_id=RUN,
        round=message.round,
        timestamp=time.time(),
    )
    return list(serde.secure_message_parts(header, frame))


async def send(stub: pb_grpc.CoordinatorStub, parts: list[Any]) -> RejectCode | None:
    async def stream() -> AsyncIterator[pb.SecureMessagePart]:
        for part in parts:
            yield part

    response = await stub.SubmitSecureMessage(stream())
    return serde.decode_submit_secure_message_response(response).code


async def plaintext_update(
    stub: pb_grpc.CoordinatorStub, enrollment: Enrollment, base: str
) -> RejectCode | None:
    payload = Parameters.from_arrays([np.zeros(SIZE, np.float32)]).to_bytes()
    header = pb.UpdateHeader(
        round=1,
        run_id=RUN,
        num_examples=5,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        total_size=len(payload),
        base_model_sha256=base,
    )
    serde.sign_message(
        header,
        enrollment.private_key,
        client_id=enrollment.client_id,
        run_id=RUN,
        round=1,
        timestamp=time.time(),
    )

    async def stream() -> AsyncIterator[pb.UpdatePart]:
        for part in serde.update_parts(header, payload):
            yield part

    response = await stub.SubmitUpdate(stream())
    return serde.decode_submit_update_response(response).code


async def refusals(deployment: Deployment, enrollment: Enrollment) -> dict[str, Any]:
    """Bad secure messages while the round is at its masked-input stage, each with its code."""
    keys = Advertisement(PublicKeys(os.urandom(32), os.urandom(32)), bytes(32), bytes(64))
    codes: dict[str, Any] = {}
    async with grpc.aio.secure_channel(deployment.target, deployment.credentials) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        codes["earlier round"] = await send(stub, secure_parts(enrollment, KeysAdvertised(0, keys)))
        codes["earlier stage"] = await send(stub, secure_parts(enrollment, KeysAdvertised(1, keys)))
        garbage = secure_parts(enrollment, KeysAdvertised(1, keys), frame=b"SSA2\x05garbage")
        codes["garbage frame"] = await send(stub, garbage)
        request = encode_message(UnmaskRequest(1, {}))
        forged = secure_parts(enrollment, KeysAdvertised(1, keys), frame=request)
        codes["a request, not a reply"] = await send(stub, forged)
        replayed = secure_parts(enrollment, KeysAdvertised(0, keys))
        await send(stub, replayed)
        codes["replayed"] = await send(stub, replayed)
        codes["headless"] = await send(stub, replayed[1:])
        huge = secure_parts(enrollment, KeysAdvertised(1, keys), size=2**40)
        codes["oversized"] = await send(stub, huge)
        base = deployment.driver.model_sha256()
        codes["plaintext update"] = await plaintext_update(stub, enrollment, base)
    return codes


def test_a_secure_round_over_grpc_survives_a_stalled_client(tmp_path: Path) -> None:
    plain = contributions()
    stalled = Stalling(*plain[0])
    enrollments = [
        load_or_create_enrollment(tmp_path / f"c{index}", generate_client_key)
        for index in range(CLIENTS)
    ]
    plaintext_from: list[str] = []  # who began a plaintext upload (screened before its bytes)

    async def body(deployment: Deployment) -> dict[str, RejectCode | None]:
        driver = deployment.driver
        original = driver.screen_upload

        def spy(client_id: str, round_number: int, *, secure: bool = False) -> Any:
            if not secure:
                plaintext_from.append(client_id)
            return original(client_id, round_number, secure=secure)

        driver.screen_upload = spy  # type: ignore[method-assign]
        links = [
            GrpcLink(deployment.target, credentials=deployment.credentials, enrollment_token=TOKEN)
            for _ in enrollments
        ]
        runtimes = [
            ClientRuntime(
                stalled if index == 0 else FixedUpdate(*plain[index]),
                link,
                enrollment,
                backoff=Backoff(0.01, 0.1),
                seed=index,
            )
            for index, (link, enrollment) in enumerate(zip(links, enrollments, strict=True))
        ]
        tasks = [asyncio.create_task(runtime.run()) for runtime in runtimes]
        runner = asyncio.create_task(driver.run())
        assert await asyncio.to_thread(stalled.training.wait, 30)  # masked-input stage is open
        codes = await refusals(deployment, enrollments[0])
        await asyncio.wait_for(runner, timeout=60)
        stalled.release.set()
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks)
        for link in links:
            await link.close()
        return codes

    try:
        codes, commits = asyncio.run(with_secure_coordinator(tmp_path, body))
    finally:
        stalled.release.set()
    assert codes == {
        "earlier round": RejectCode.LATE,
        "earlier stage": RejectCode.LATE,
        "garbage frame": RejectCode.MALFORMED,
        "a request, not a reply": RejectCode.MALFORMED,
        "replayed": RejectCode.REPLAYED,
        "headless": RejectCode.MALFORMED,
        "oversized": RejectCode.OVERSIZED,
        "plaintext update": RejectCode.INVALID_UPDATE,
    }
    assert plaintext_from == [enrollments[0].client_id]  # the test's own; no runtime sent one
    assert [commit.round for commit in commits] == [1]
    summary = commits[0].summary
    report = summary.secure
    assert report is not None and report.protocol == "secagg+" and not report.aborted
    assert summary.reported == CLIENTS - 1 and report.recovered == 1
    assert dict(report.dropped) == {
        "advertise_keys": 0,
        "share_keys": 0,
        "masked_input": 1,  # closed at its deadline, without the stalled client
        "consistency": 0,
        "unmask": 0,
    }
    survivors = plain[1:]
    weights = np.array([n for _, n in survivors], dtype=np.float64)
    expected = sum(n * u.astype(np.float64) for u, n in survivors) / weights.sum()
    fitted = QUANTIZATION.fitted(CLIENTS)
    bound = fitted.error_bound(len(survivors)) / (weights.sum() / fitted.max_weight)
    assert np.max(np.abs(commits[0].parameters.vector - expected)) <= bound + 1e-6
    assert summary.num_examples == int(weights.sum())


# --- setup ------------------------------------------------------------------------------------


def network_config(tmp_path: Path, *, strategy: str = "fedavg", **secure: Any) -> Config:
    return parse_config(
        {
            "coordinator": {"state_dir": str(tmp_path / "state"), "run_id": RUN},
            "secure_aggregation": {"protocol": "secagg+", **secure},
            "strategy": {"name": strategy},
        }
    )


def test_the_server_builds_a_secure_coordinator_from_its_config(tmp_path: Path) -> None:
    parts = build(network_config(tmp_path, degree=3))
    try:
        secure = parts.driver.coordinator.secure
        assert secure is not None and secure.protocol == "secagg+"
        assert secure.run_id == RUN and secure.degree == 3
    finally:
        parts.database.close()


def test_a_secure_config_that_cannot_work_is_refused_before_anything_opens(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="needs each client's update"):
        build(network_config(tmp_path, strategy="krum"))
    assert not (tmp_path / "state").exists()
