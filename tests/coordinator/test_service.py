"""The gRPC coordinator on 127.0.0.1 with TLS: clients train, bad input is refused, it serves on."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.apps.builtin import DataScenario
from shoal.client.api import Client, EvaluateConfig, EvaluateResult, FitConfig, FitResult
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import SelectionSection
from shoal.coordinator import CommitVersion, Coordinator, RoundSettings, RoundSummary
from shoal.coordinator.driver import DriverSettings, RoundDriver
from shoal.coordinator.schedule import schedule
from shoal.coordinator.service import (
    CoordinatorService,
    ServiceSettings,
    add_coordinator_service,
)
from shoal.core import DeviceState, Parameters
from shoal.registry import (
    ClientRegistry,
    ClientStatus,
    Component,
    EnrollmentTokens,
    SelectionCriteria,
    VersionMatrix,
    open_database,
)
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport._generated import coordinator_pb2_grpc as pb_grpc
from shoal.transport.certs import (
    init_certificates,
    load_channel_credentials,
    load_server_credentials,
)
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.messages import EnrollmentRequest, RejectCode
from shoal.transport.signing import generate_client_key
from support.driving import closing
from support.jobs import bare_config

T = TypeVar("T")
TOKEN = "let-me-in"
RUN = "run-test"


@dataclass
class Deployment:
    target: str
    credentials: grpc.ChannelCredentials
    driver: RoundDriver
    service: CoordinatorService
    clients: ClientRegistry
    commits: list[CommitVersion]
    scenario: DataScenario
    summaries: list[RoundSummary]


async def with_coordinator(
    tmp_path: Path,
    body: Callable[[Deployment], Awaitable[T]],
    *,
    rounds: int,
    clients_per_round: int = 4,
) -> T:
    certificates = init_certificates(tmp_path / "certs")
    scenario = DataScenario(bare_config(["data.num_clients=6", "round.clients_per_round=4"]))
    coordinator = Coordinator(
        settings=RoundSettings(
            clients_per_round=clients_per_round,
            quorum=0.5,
            deadline_s=10.0,
            epochs=2,
            learning_rate=0.2,
        ),
        strategy=make_strategy("fedavg"),
        parameters=scenario.initial_parameters(),
        seed=0,
    )
    database = open_database(None, folder=tmp_path / "registry")
    clients = ClientRegistry(database)
    commits: list[CommitVersion] = []
    summaries: list[RoundSummary] = []

    async def persist(commit: CommitVersion) -> None:
        commits.append(commit)

    def candidates() -> list[str]:
        return [record.client_id for record in clients.list(status=ClientStatus.ACTIVE, limit=1000)]

    driver = RoundDriver(
        coordinator,
        DriverSettings(retry_after_s=0.05),
        plays=schedule(rounds=rounds),
        candidates=candidates,
        on_closed=closing(persist, summaries.append),
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
        return await body(
            Deployment(
                f"127.0.0.1:{port}",
                credentials,
                driver,
                service,
                clients,
                commits,
                scenario,
                summaries,
            )
        )
    finally:
        await server.stop(None)
        database.close()


async def run_clients(
    tmp_path: Path, deployment: Deployment, wrap: Callable[[Client], Client] = lambda c: c
) -> None:
    """Every client of the scenario (its model passed through ``wrap``) until the job ends."""
    runtimes, links = [], []
    for index, client_id in enumerate(deployment.scenario.client_ids):
        link = GrpcLink(
            deployment.target, credentials=deployment.credentials, enrollment_token=TOKEN
        )
        enrollment = load_or_create_enrollment(tmp_path / client_id, generate_client_key)
        runtime = ClientRuntime(
            wrap(deployment.scenario.build_client(client_id)),
            link,
            enrollment,
            backoff=Backoff(0.01, 0.1),
            seed=index,
        )
        runtimes.append(runtime)
        links.append(link)
    tasks = [asyncio.create_task(runtime.run()) for runtime in runtimes]
    await asyncio.wait_for(deployment.driver.run(), timeout=60)
    for runtime in runtimes:
        runtime.stop()
    await asyncio.gather(*tasks)
    for link in links:
        await link.close()


def test_clients_train_over_grpc_with_tls(tmp_path: Path) -> None:
    asyncio.run(with_coordinator(tmp_path, lambda d: run_clients(tmp_path, d), rounds=3))


class Crashing(Client):
    """A client whose model raises in training, with a multi-line message."""

    def __init__(self, inner: Client) -> None:
        self.inner = inner

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        raise RuntimeError("out of memory\non the device " + "x" * 1000)

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return self.inner.evaluate(parameters, config)


def test_clients_that_give_up_are_counted_at_once_not_left_to_the_deadline(
    tmp_path: Path,
) -> None:
    async def body(deployment: Deployment) -> list[RoundSummary]:
        await run_clients(tmp_path, deployment, Crashing)
        return deployment.summaries

    summaries = asyncio.run(with_coordinator(tmp_path, body, rounds=2))
    assert [summary.round for summary in summaries] == [1, 2]
    for summary in summaries:
        # every crash was reported over gRPC: the round closed with nobody left to wait for
        assert (summary.reported, summary.outstanding) == (0, 0)
        assert summary.failed == summary.selected > 0
        assert not summary.committed


# --- bad input, each with its code, and the coordinator still serving ------------------------


def signed(
    message: Any, private_key: bytes, client_id: str, *, round_number: int = -1, run: str = RUN
) -> Any:
    serde.sign_message(
        message,
        private_key,
        client_id=client_id,
        run_id=run,
        round=round_number,
        timestamp=time.time(),
    )
    return message


async def enroll(stub: pb_grpc.CoordinatorStub, client_id: str) -> bytes:
    private, public = generate_client_key()
    request = serde.encode_enroll_request(EnrollmentRequest(DeviceState(), public, TOKEN))
    response = await stub.Enroll(signed(request, private, client_id))
    assert response.verdict.accepted, response.verdict.detail
    return private


async def upload(
    stub: pb_grpc.CoordinatorStub, header: pb.UpdateHeader, payload: bytes
) -> RejectCode | None:
    async def parts() -> AsyncIterator[pb.UpdatePart]:
        for part in serde.update_parts(header, payload):
            yield part

    response = await stub.SubmitUpdate(parts())
    return serde.decode_submit_update_response(response).code


def header_for(
    private: bytes,
    client_id: str,
    payload: bytes,
    base: str,
    *,
    round_number: int = 1,
    size: int | None = None,
) -> pb.UpdateHeader:
    header = pb.UpdateHeader(
        round=round_number,
        run_id=RUN,
        num_examples=5,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        total_size=len(payload) if size is None else size,
        base_model_sha256=base,
    )
    return signed(header, private, client_id, round_number=round_number)


def test_bad_input_gets_a_code_and_the_coordinator_keeps_serving(tmp_path: Path) -> None:
    async def body(deployment: Deployment) -> dict[str, RejectCode | None]:
        codes: dict[str, RejectCode | None] = {}
        async with grpc.aio.secure_channel(deployment.target, deployment.credentials) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            keys = {name: await enroll(stub, name) for name in ("alice", "bob", "carol")}
            runner = asyncio.create_task(deployment.driver.run())
            offers = {}
            while len(offers) < 2:
                await asyncio.sleep(0.02)
                for name in keys:
                    outcome = deployment.driver.check_in(name)
                    if hasattr(outcome, "model_sha256"):
                        offers[name] = outcome
            name = next(iter(offers))
            private, base = keys[name], offers[name].model_sha256  # type: ignore[attr-defined]
            model = deployment.driver.coordinator.parameters
            good = model.with_vector(np.zeros(len(model), np.float32)).to_bytes()

            stranger = serde.encode_check_in_request(DeviceState())
            reply = await stub.CheckIn(signed(stranger, generate_client_key()[0], "mallory"))
            codes["unknown client"] = serde.decode_check_in_response(reply).code  # type: ignore[union-attr]

            forged = serde.encode_check_in_request(DeviceState())
            reply = await stub.CheckIn(signed(forged, generate_client_key()[0], name))
            codes["forged signature"] = serde.decode_check_in_response(reply).code  # type: ignore[union-attr]

            request = signed(
                pb.HeartbeatRequest(device=serde.encode_device_state(DeviceState())), private, name
            )
            await stub.Heartbeat(request)
            codes["replayed"] = serde.decode_heartbeat_response(
                await stub.Heartbeat(request)
            ).verdict.code

            codes["wrong model hash"] = await upload(
                stub, header_for(private, name, good, "0" * 64), good
            )
            codes["oversized"] = await upload(
                stub, header_for(private, name, good, base, size=2**40), good
            )
            garbage = b"\x00not safetensors"
            codes["malformed bytes"] = await upload(
                stub, header_for(private, name, garbage, base), garbage
            )
            wrong_shape = Parameters.from_arrays([np.zeros(3, np.float32)]).to_bytes()
            codes["wrong shape"] = await upload(
                stub, header_for(private, name, wrong_shape, base), wrong_shape
            )
            nan = model.with_vector(np.full(len(model), np.nan, np.float32)).to_bytes()
            other = next(n for n in offers if n != name)
            codes["nan"] = await upload(stub, header_for(keys[other], other, nan, base), nan)
            codes["wrong round"] = await upload(
                stub, header_for(keys[other], other, good, base, round_number=7), good
            )
            alive = signed(
                pb.HeartbeatRequest(device=serde.encode_device_state(DeviceState())), private, name
            )
            codes["still serving"] = serde.decode_heartbeat_response(
                await stub.Heartbeat(alive)
            ).verdict.code
            runner.cancel()
        return codes

    codes = asyncio.run(with_coordinator(tmp_path, body, rounds=1))
    assert codes == {
        "unknown client": RejectCode.UNKNOWN_CLIENT,
        "forged signature": RejectCode.UNKNOWN_CLIENT,  # as an unknown id: nothing to enumerate
        "replayed": RejectCode.REPLAYED,
        "wrong model hash": RejectCode.WRONG_MODEL_HASH,
        "oversized": RejectCode.OVERSIZED,
        "malformed bytes": RejectCode.MALFORMED,
        "wrong shape": RejectCode.INVALID_UPDATE,
        "nan": RejectCode.INVALID_UPDATE,
        "wrong round": RejectCode.WRONG_ROUND,
        "still serving": None,
    }


def test_enrollment_needs_a_valid_token_and_keeps_its_key(tmp_path: Path) -> None:
    async def body(deployment: Deployment) -> list[RejectCode | None]:
        codes = []
        async with grpc.aio.secure_channel(deployment.target, deployment.credentials) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            private, public = generate_client_key()
            bad = serde.encode_enroll_request(EnrollmentRequest(DeviceState(), public, "guess"))
            codes.append(
                serde.decode_enroll_response(
                    await stub.Enroll(signed(bad, private, "eve"))
                ).verdict.code
            )
            await enroll(stub, "dave")
            other_private, other_public = generate_client_key()
            hijack = serde.encode_enroll_request(
                EnrollmentRequest(DeviceState(), other_public, TOKEN)
            )
            reply = await stub.Enroll(signed(hijack, other_private, "dave"))
            codes.append(serde.decode_enroll_response(reply).verdict.code)
        return codes

    assert asyncio.run(with_coordinator(tmp_path, body, rounds=1)) == [
        RejectCode.BAD_TOKEN,
        RejectCode.BAD_SIGNATURE,
    ]


pytestmark = pytest.mark.timeout(120)


def test_an_issued_token_admits_one_new_client_and_restarts_use_none(tmp_path: Path) -> None:
    async def body(deployment: Deployment) -> list[RejectCode | None]:
        token = EnrollmentTokens(deployment.clients.database).issue(expires_in=timedelta(hours=1))
        frank, gina = generate_client_key(), generate_client_key()
        attempts = [("frank", frank), ("frank", frank), ("gina", gina)]  # frank twice: a restart
        codes = []
        async with grpc.aio.secure_channel(deployment.target, deployment.credentials) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            for name, (private, public) in attempts:
                request = serde.encode_enroll_request(
                    EnrollmentRequest(DeviceState(), public, token)
                )
                reply = await stub.Enroll(signed(request, private, name))
                codes.append(serde.decode_enroll_response(reply).verdict.code)
        return codes

    codes = asyncio.run(with_coordinator(tmp_path, body, rounds=1))
    assert codes == [None, None, RejectCode.BAD_TOKEN]  # the single use went to frank


def test_garbage_after_a_good_header_is_malformed_and_the_service_serves_on(
    tmp_path: Path,
) -> None:
    """The servicer parses every part of an upload itself: a corrupt second part of a cohort
    member's upload (whose bytes the round takes in) is refused."""

    async def body(deployment: Deployment) -> tuple[Any, RejectCode | None]:
        async with grpc.aio.secure_channel(deployment.target, deployment.credentials) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            private = await enroll(stub, "alice")
            runner = asyncio.create_task(deployment.driver.run())
            while not hasattr(deployment.driver.check_in("alice"), "model_sha256"):
                await asyncio.sleep(0.02)
            base, _ = deployment.service.model_bytes.current()
            payload = b"x" * 10
            opening = pb.UpdatePart(header=header_for(private, "alice", payload, base))

            async def parts() -> AsyncIterator[bytes]:
                yield opening.SerializeToString()
                yield b"\xff" * 8  # not a protobuf UpdatePart

            upload = channel.stream_unary("/shoal.v1.Coordinator/SubmitUpdate")
            raw = await upload(parts(), timeout=10)
            verdict = serde.decode_submit_update_response(serde.parse(pb.SubmitUpdateResponse, raw))
            alive = signed(
                pb.HeartbeatRequest(device=serde.encode_device_state(DeviceState())),
                private,
                "alice",
            )
            reply = serde.decode_heartbeat_response(await stub.Heartbeat(alive))
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        return verdict, reply.verdict.code

    verdict, still_serving = asyncio.run(
        with_coordinator(tmp_path, body, rounds=1, clients_per_round=1)
    )
    assert verdict.code is RejectCode.MALFORMED
    assert "8 bytes that do not parse as a protobuf UpdatePart" in verdict.detail
    assert still_serving is None


def test_an_update_the_versioning_matrix_no_longer_accepts_is_refused(tmp_path: Path) -> None:
    """A requirement added after a client was selected, or a client whose versions changed
    since: its update is refused with the reason, and the round stops waiting for it."""

    async def body(deployment: Deployment) -> tuple[Any, ...]:
        policy = SelectionCriteria.from_section(SelectionSection(), model="digits-mlp")
        deployment.service.settings = replace(deployment.service.settings, criteria=lambda: policy)
        async with grpc.aio.secure_channel(deployment.target, deployment.credentials) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            keys = {name: await enroll(stub, name) for name in ("alice", "bob", "carol")}
            runner = asyncio.create_task(deployment.driver.run())
            offers: dict[str, Any] = {}
            while len(offers) < 3:
                await asyncio.sleep(0.02)
                for name in keys:
                    outcome = deployment.driver.check_in(name)
                    if hasattr(outcome, "model_sha256"):
                        offers[name] = outcome
            base = offers["alice"].model_sha256
            VersionMatrix(deployment.clients.database).require(
                "digits-mlp", Component.APP, minimum="9.0"
            )
            model = deployment.driver.coordinator.parameters
            good = model.with_vector(np.zeros(len(model), np.float32)).to_bytes()
            refused = await upload(stub, header_for(keys["alice"], "alice", good, base), good)
            reply = await stub.CheckIn(
                signed(serde.encode_check_in_request(DeviceState()), keys["alice"], "alice")
            )
            check_in = serde.decode_check_in_response(reply)
            matrix = VersionMatrix(deployment.clients.database)
            matrix.require("digits-mlp", Component.APP, minimum="1.0")  # 1.0.0 passes
            # bob, selected with app 1.0.0, comes back running 0.9 (a downgrade) before uploading
            downgraded = serde.encode_check_in_request(DeviceState(app_version="0.9"))
            reply = await stub.CheckIn(signed(downgraded, keys["bob"], "bob"))
            bob_check_in = serde.decode_check_in_response(reply)
            others = [
                await upload(stub, header_for(keys[name], name, good, base), good)
                for name in ("bob", "carol")
            ]
            await asyncio.wait_for(runner, timeout=5)  # not the 10 s deadline: nobody is awaited
        return refused, check_in, bob_check_in, others

    refused, check_in, bob_check_in, others = asyncio.run(
        with_coordinator(tmp_path, body, rounds=1, clients_per_round=3)
    )
    reason = "app version 1.0.0 is below the minimum 9.0 for model arch digits-mlp"
    assert refused is RejectCode.INCOMPATIBLE
    assert (check_in.code, check_in.detail) == (RejectCode.INCOMPATIBLE, reason)
    assert bob_check_in.code is RejectCode.INCOMPATIBLE
    assert others == [RejectCode.INCOMPATIBLE, None]  # bob's versions changed; carol's did not
