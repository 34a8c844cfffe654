"""Attested clients over real gRPC with TLS on 127.0.0.1: allowed builds train, others are refused.

Each refusal is an attack or a mistake played for real: a client that sends
no evidence, one whose app file was changed after its manifest was signed,
a manifest signed by a key the coordinator does not trust, one the operator
never allowed, one revoked (before the run, and mid-run at the next
check-in), and evidence lifted from another request or another client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal.client.link import CheckIn, Enroll
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import Config, parse_config
from shoal.coordinator.server import CoordinatorParts, build, serve
from shoal.coordinator.service import add_coordinator_service
from shoal.core import ConfigError, DeviceState, SecurityError
from shoal.governance import (
    Attester,
    Binding,
    Evidence,
    load_release_private_key,
    release_statement,
    sign_manifest,
)
from shoal.registry import AllowedBuilds, EnrollmentTokens, registry_location
from shoal.tasks import RetryLater
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport._generated import coordinator_pb2_grpc as pb_grpc
from shoal.transport.certs import (
    CertificateFiles,
    init_certificates,
    load_channel_credentials,
    load_server_credentials,
)
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.messages import RejectCode
from shoal.transport.signing import generate_client_key, new_nonce
from support.attestation import Release
from support.jobs import digits_client, network_job

pytestmark = pytest.mark.timeout(120)

TOKEN = "attest-token"
RUN = "run-attested"
GOOD_CLIENTS = 3


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Release]:
    made = Release.make(tmp_path / "release")
    yield made
    made.close()


def job(tmp_path: Path, release: Release, *, per_round: int, **coordinator: Any) -> Config:
    sections = network_job(
        tmp_path,
        run_id=RUN,
        token=TOKEN,
        clients=GOOD_CLIENTS,
        per_round=per_round,
        run={"rounds": 2},
        round={"quorum": 1.0, "deadline_s": 30},
        coordinator={
            "certificates": str(tmp_path / "certs"),
            "attestation": "manifest",
            "release_keys": [str(release.public_key)],
            **coordinator,
        },
    )
    return parse_config(sections)


def allow_list(config: Config) -> tuple[AllowedBuilds, Any]:
    database = registry_location(Path(config.coordinator.state_dir), None).open()
    return AllowedBuilds(database), database


async def enroll(target: str, ca: Path, state: Path, attester: Attester | None) -> str:
    """Enroll a new identity; what the coordinator answered ("accepted" or the refusal)."""
    link = GrpcLink(target, credentials=load_channel_credentials(ca), enrollment_token=TOKEN)
    enrollment = load_or_create_enrollment(state, generate_client_key)
    try:
        await link.handle(enrollment, Enroll(DeviceState(), attester))
    except SecurityError as exc:
        return str(exc)
    finally:
        await link.close()
    return "accepted"


def test_attested_clients_train_and_each_other_client_is_refused_with_its_reason(
    tmp_path: Path, release: Release
) -> None:
    certificates = init_certificates(tmp_path / "certs")
    config = job(
        tmp_path,
        release,
        per_round=GOOD_CLIENTS,
        # exactly the good clients' uses: a refused enrollment must not redeem one
        enrollment_tokens=[{"token": TOKEN, "max_uses": GOOD_CLIENTS}],
    )
    good = release.manifest(label="v1")
    untrusted = release.manifest(key="untrusted", label="v1")
    unlisted = release.manifest(label="v1-never-allowed")
    revoked = release.manifest(label="v0")
    tampered_release = Release.make(tmp_path / "tampered")
    try:
        signer = load_release_private_key(release.folder / "release.key")
        tampered = sign_manifest(release_statement(tampered_release.app, label="v1"), signer)
        builds, database = allow_list(config)
        try:
            for manifest in (good, revoked, tampered):
                builds.allow(
                    build_id=manifest.manifest_id, kind="manifest", by="ana", reason="QA passed"
                )
            builds.revoke(revoked.manifest_id, by="ana", reason="CVE-2026-0001 in v0")
        finally:
            database.close()
        # the app file changes after its manifest was signed: the install no longer matches
        with tampered_release.app_file.open("a") as handle:
            handle.write("\nLEAK_TO = 'https://attacker.example'\n")
        bad = {
            "no-evidence": None,
            "modified": tampered_release.attester(tampered),
            "untrusted-key": release.attester(untrusted),
            "not-allowed": release.attester(unlisted),
            "revoked": release.attester(revoked),
        }
        refused, rounds, parts = asyncio.run(
            serve_attested(tmp_path, config, certificates, release.attester(good), bad)
        )
    finally:
        tampered_release.close()

    prefix = "enrollment refused (unattested): "
    assert refused["no-evidence"].startswith(prefix + "missing: ")
    assert refused["modified"].startswith(prefix + "modified: the app's code")
    assert tampered_release.app in refused["modified"]
    assert refused["untrusted-key"].startswith(prefix + "untrusted_key: ")
    assert refused["not-allowed"].startswith(prefix + "not_allowed: ")
    assert refused["revoked"].startswith(prefix + "revoked: ")
    assert "by ana" in refused["revoked"] and "CVE-2026-0001 in v0" in refused["revoked"]
    # the attested clients trained every round; the refused ones are not even enrolled
    assert [row["round"] for row in rounds] == [1, 2]
    assert all(row["committed"] and row["reported"] == GOOD_CLIENTS for row in rounds)
    assert parts.service.refusals[RejectCode.UNATTESTED.value] == len(bad)
    gate = parts.service.admission.attestation
    assert gate is not None and gate.refused() == {}  # made-up ids are not remembered
    database = registry_location(Path(config.coordinator.state_dir), None).open()
    try:
        (token,) = EnrollmentTokens(database).list()
        assert token.uses_left == 0  # the three good clients took the three uses
        enrolled = {record.client_id for record in parts.clients.list(limit=100)}
        assert len(enrolled) == GOOD_CLIENTS
    finally:
        database.close()


async def serve_attested(
    tmp_path: Path,
    config: Config,
    certificates: CertificateFiles,
    good: Attester,
    bad: dict[str, Attester | None],
) -> tuple[dict[str, str], list[dict[str, Any]], CoordinatorParts]:
    """Serve the job; the bad clients try to enroll first, then the good ones train to the end."""
    refused: dict[str, str] = {}
    rounds: list[dict[str, Any]] = []
    runtimes: list[ClientRuntime] = []
    links: list[GrpcLink] = []
    tasks: list[asyncio.Task[None]] = []
    ca = certificates.ca.certificate

    async def clients(target: str) -> None:
        for name, attester in bad.items():
            refused[name] = await enroll(target, ca, tmp_path / name, attester)
        for index in range(GOOD_CLIENTS):
            link = GrpcLink(
                target, credentials=load_channel_credentials(ca), enrollment_token=TOKEN
            )
            enrollment = load_or_create_enrollment(tmp_path / f"good-{index}", generate_client_key)
            runtime = ClientRuntime(
                digits_client(index, GOOD_CLIENTS),
                link,
                enrollment,
                backoff=Backoff(0.01, 0.1),
                seed=index,
                attester=good,
            )
            links.append(link)
            runtimes.append(runtime)
            tasks.append(asyncio.create_task(runtime.run()))

    def on_ready(port: int, first_round: int) -> None:
        tasks.append(asyncio.create_task(clients(f"127.0.0.1:{port}")))

    try:
        parts = await asyncio.wait_for(
            serve(config, on_round=rounds.append, on_ready=on_ready), timeout=90
        )
    finally:
        for runtime in runtimes:
            runtime.stop()
        await asyncio.gather(*tasks)
        for link in links:
            await link.close()
    return refused, rounds, parts


# --- at each check-in: revocation mid-run, missing evidence, evidence made for another request ---


@asynccontextmanager
async def coordinator(
    config: Config, certificates: CertificateFiles
) -> AsyncIterator[tuple[str, CoordinatorParts]]:
    """The job's service on a TLS port, its rounds not driven: check-ins get "retry later"."""
    parts = build(config)
    server = grpc.aio.server()
    add_coordinator_service(parts.service, server)
    port = server.add_secure_port("127.0.0.1:0", load_server_credentials(certificates.server))
    await server.start()
    try:
        yield f"127.0.0.1:{port}", parts
    finally:
        await server.stop(None)
        parts.close()


def check_in_message(
    private_key: bytes, client_id: str, evidence: Evidence | None, *, nonce: bytes | None = None
) -> pb.CheckInRequest:
    message = serde.encode_check_in_request(DeviceState())
    serde.set_evidence(message, evidence)
    serde.sign_message(
        message,
        private_key,
        client_id=client_id,
        run_id="pending",
        round=-1,
        timestamp=time.time(),
        nonce=nonce,
    )
    return message


def test_each_check_in_is_attested_and_a_revocation_refuses_the_next_one(
    tmp_path: Path, release: Release
) -> None:
    certificates = init_certificates(tmp_path / "certs")
    config = job(tmp_path, release, per_round=GOOD_CLIENTS)  # two clients: no round starts
    manifest = release.manifest(label="v1")
    attester = release.attester(manifest)
    builds, database = allow_list(config)
    builds.allow(build_id=manifest.manifest_id, kind="manifest", by="ana", reason="QA passed")

    async def body() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with coordinator(config, certificates) as (target, parts):
            ca = certificates.ca.certificate
            link = GrpcLink(
                target, credentials=load_channel_credentials(ca), enrollment_token=TOKEN
            )
            me = load_or_create_enrollment(tmp_path / "me", generate_client_key)
            other = load_or_create_enrollment(tmp_path / "other", generate_client_key)
            try:
                for enrollment in (me, other):
                    await link.handle(enrollment, Enroll(DeviceState(), attester))
                seen["attested"] = await link.handle(me, CheckIn(DeviceState(), attester))
                seen["no evidence"] = await link.handle(me, CheckIn(DeviceState()))
            finally:
                await link.close()
            async with grpc.aio.secure_channel(target, load_channel_credentials(ca)) as channel:
                stub = pb_grpc.CoordinatorStub(channel)
                # evidence made for one of my requests, sent with another (a fresh nonce)
                mine = Binding(me.client_id, me.public_key, "pending", new_nonce())
                lifted = Evidence("manifest", attester.evidence(mine.challenge()))
                message = check_in_message(me.private_key, me.client_id, lifted)
                seen["other request"] = serde.decode_check_in_response(await stub.CheckIn(message))
                # my evidence, for my nonce, in another client's request with that very nonce
                message = check_in_message(
                    other.private_key, other.client_id, lifted, nonce=mine.nonce
                )
                seen["other client"] = serde.decode_check_in_response(await stub.CheckIn(message))
            selectable = parts.driver._candidates  # the coordinator's own cohort source
            seen["candidates refused"] = sorted(selectable())  # both just sent unbound evidence
            link = GrpcLink(
                target, credentials=load_channel_credentials(ca), enrollment_token=TOKEN
            )
            try:  # a check-in that passes clears a refusal
                for enrollment in (me, other):
                    await link.handle(enrollment, CheckIn(DeviceState(), attester))
            finally:
                await link.close()
            seen["candidates before"] = sorted(selectable())
            builds.revoke(manifest.manifest_id[:12], by="ana", reason="key leaked")
            link = GrpcLink(
                target, credentials=load_channel_credentials(ca), enrollment_token=TOKEN
            )
            try:
                seen["revoked"] = await link.handle(me, CheckIn(DeviceState(), attester))
            finally:
                await link.close()
            seen["candidates after"] = sorted(selectable())
            async with grpc.aio.secure_channel(target, load_channel_credentials(ca)) as channel:
                stub = pb_grpc.CoordinatorStub(channel)
                beat = serde.encode_heartbeat_request(DeviceState())
                serde.sign_message(
                    beat, me.private_key, client_id=me.client_id, run_id="pending", round=-1,
                    timestamp=time.time(),
                )  # fmt: skip
                reply = serde.decode_heartbeat_response(await stub.Heartbeat(beat))
                seen["heartbeat"] = reply.verdict
            seen["ids"] = (me.client_id, other.client_id)
        return seen

    try:
        seen = asyncio.run(body())
    finally:
        database.close()
    assert isinstance(seen["attested"], RetryLater)
    assert seen["attested"].reason == "no task for this client now"
    assert seen["no evidence"].reason.startswith("unattested: missing: ")
    for case in ("other request", "other client"):
        assert seen[case].code is RejectCode.UNATTESTED, case
        assert seen[case].detail.startswith("unbound: "), case
    assert seen["revoked"].reason.startswith("unattested: revoked: ")
    assert "key leaked" in seen["revoked"].reason
    # refused, it is no longer selected, and a heartbeat does not make it seen again
    mine, others = seen["ids"]
    assert seen["candidates refused"] == []
    assert seen["candidates before"] == sorted([mine, others])
    assert seen["candidates after"] == [others]
    assert seen["heartbeat"].code is RejectCode.UNATTESTED
    assert "its last check-in was refused: revoked: " in seen["heartbeat"].detail


def test_a_coordinator_without_attestation_admits_clients_as_before(
    tmp_path: Path, release: Release
) -> None:
    certificates = init_certificates(tmp_path / "certs")
    config = job(tmp_path, release, per_round=GOOD_CLIENTS, attestation="none", release_keys=[])
    assert config.coordinator.attestation == []

    async def body() -> str:
        async with coordinator(config, certificates) as (target, _):
            return await enroll(target, certificates.ca.certificate, tmp_path / "plain", None)

    assert asyncio.run(body()) == "accepted"


def test_a_missing_release_key_or_verifier_stops_the_coordinator_before_it_serves(
    tmp_path: Path, release: Release
) -> None:
    missing = job(tmp_path, release, per_round=1, release_keys=[str(tmp_path / "nope.pub")])
    with pytest.raises(ConfigError, match=r"nope\.pub"):
        build(missing)
    plugged = job(
        tmp_path,
        release,
        per_round=1,
        attestation=["manifest", "tee-quote"],
        attestation_verifiers={"tee-quote": "no_such_module_anywhere:Verifier"},
    )
    with pytest.raises(ConfigError, match=r"tee-quote.*cannot import"):
        build(plugged)
