"""Enrollment attacks over real gRPC: hostile client ids, and tokens used past their limits.

The attacker speaks protobuf directly (no Shoal client code, which would
refuse to sign a bad id): it signs its own requests with a fresh key. Each
hostile id must be refused with a verdict that says what a client id may
be, and nothing of it may reach the registry. A token listed in the config
must enroll no more clients than its ``max_uses`` (100 for a bare secret),
none after it expires, and a restart must not give its uses back.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal.client.link import Enroll, Enrollment
from shoal.coordinator.guesses import guess_source, trusted_networks
from shoal.coordinator.server import CoordinatorParts
from shoal.core import BusyError, DeviceState, ProtocolError
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.messages import EnrollmentRequest, RejectCode
from shoal.transport.signing import NO_ROUND, generate_client_key, new_nonce, sign_request
from support.peers import served as served_job

pytestmark = pytest.mark.timeout(120)

RUN = "run-enroll"
TOKEN = "fleet-secret"
ENROLL = "/shoal.v1.Coordinator/Enroll"
RULE = "a client id is 1 to 128 ASCII letters, digits, '.', '_' or '-'"

HOSTILE_IDS = [
    "../../etc/passwd",
    "..",
    "'; DROP TABLE clients; --",
    "client\x00admin",
    "",
    "c" * 129,
    "\u0430dmin",  # a Cyrillic a: looks like "admin"
    "\uff43lient-1",  # a fullwidth c
    "client-1\u200b",  # a zero-width space
    "client-1\nINFO shoal.coordinator: forged log line",
    "client-1 ",
    "-rf",
    "$(reboot)",
    "%2e%2e%2fetc",
]


def served(
    tmp_path: Path, tokens: list[Any]
) -> AbstractAsyncContextManager[tuple[str, CoordinatorParts]]:
    """The coordinator ``shoal coordinator serve`` builds, its service on 127.0.0.1."""
    return served_job(tmp_path, run_id=RUN, tokens=tokens)


def forged_enroll(client_id: str, token: str, **device: str) -> bytes:
    """An Enroll request signed by a fresh key, built field by field as an attacker would
    (``device``: its device's text fields, as they are)."""
    private, public = generate_client_key()
    message = serde.encode_enroll_request(EnrollmentRequest(DeviceState(), public, token))
    for name, text in device.items():
        setattr(message.device, name, text)
    digest, nonce, timestamp = serde.request_digest(message), new_nonce(), time.time()
    signature = sign_request(
        private,
        client_id=client_id,
        run_id="pending",
        round=NO_ROUND,
        nonce=nonce,
        timestamp=timestamp,
        payload_sha256=digest,
    )
    message.auth.CopyFrom(
        pb.RequestAuth(
            client_id=client_id,
            run_id="pending",
            round=NO_ROUND,
            nonce=nonce,
            timestamp=timestamp,
            payload_sha256=digest,
            signature=signature,
        )
    )
    return message.SerializeToString()


async def enroll(
    channel: grpc.aio.Channel,
    client_id: str,
    token: str,
    *,
    forwarded_for: str | None = None,
    **device: str,
) -> tuple[str, str]:
    """(code, detail) of an enrollment: ``accepted``, a reject code, or the gRPC status;
    ``forwarded_for``: the ``x-forwarded-for`` a proxy (or a liar) adds."""
    metadata = None if forwarded_for is None else (("x-forwarded-for", forwarded_for),)
    try:
        request = forged_enroll(client_id, token, **device)
        raw = await channel.unary_unary(ENROLL)(request, timeout=10, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        return f"grpc {error.code().name}", error.details() or ""
    reply = serde.decode_enroll_response(serde.parse(pb.EnrollResponse, raw))
    code = reply.verdict.code
    return ("accepted" if code is None else code.value), reply.verdict.detail


def test_hostile_client_ids_are_refused_with_the_rule_and_never_stored(tmp_path: Path) -> None:
    async def body() -> tuple[list[tuple[str, str]], tuple[str, str], int]:
        async with (
            served(tmp_path, [TOKEN]) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            answers = [await enroll(channel, client_id, TOKEN) for client_id in HOSTILE_IDS]
            good = await enroll(channel, "hospital-7", TOKEN)
            return answers, good, parts.clients.count()

    answers, good, enrolled = asyncio.run(body())
    for client_id, (code, detail) in zip(HOSTILE_IDS, answers, strict=True):
        assert code == RejectCode.MALFORMED.value, (client_id, code, detail)
        assert RULE in detail and "\n" not in detail, (client_id, detail)
    assert good == ("accepted", "")
    assert enrolled == 1  # only hospital-7: no hostile id reached the registry


HOSTILE_DEVICE_TEXTS = [
    "\x1b]8;;https://evil.example\x1b\\phone\x1b]8;;\x1b\\",  # a terminal hyperlink
    "\x1b[2J\x1b[Hall clients healthy",  # clears the operator's terminal
    "phone\nINFO shoal.coordinator: forged log line",
    "phone\u202e",  # turns the rest of a line around
    "",
]


@pytest.mark.parametrize(
    "field", ["device_class", "app_version", "runtime_version", "model_architecture_version"]
)
def test_device_texts_that_a_terminal_would_act_on_are_refused(tmp_path: Path, field: str) -> None:
    """A client's device class and versions are printed by ``shoal clients list``, logged and
    shown by the dashboard: a control character in them would act on the operator's terminal
    (rich prints it as is), so enrollment refuses it and stores nothing."""

    async def body() -> tuple[list[tuple[str, str]], int]:
        async with (
            served(tmp_path, [TOKEN]) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            answers = [
                await enroll(channel, f"client-{index}", TOKEN, **{field: text})
                for index, text in enumerate(HOSTILE_DEVICE_TEXTS)
            ]
            return answers, parts.clients.count()

    answers, enrolled = asyncio.run(body())
    for text, (code, detail) in zip(HOSTILE_DEVICE_TEXTS, answers, strict=True):
        assert code == RejectCode.MALFORMED.value, (text, code, detail)
        assert "printable" in detail and "\x1b" not in detail and "\n" not in detail, detail
    assert enrolled == 0


def test_the_real_client_refuses_a_bad_id_with_the_same_rule(tmp_path: Path) -> None:
    private, public = generate_client_key()

    async def body() -> None:
        async with served(tmp_path, [TOKEN]) as (target, parts):
            link = GrpcLink(target, credentials=None, enrollment_token=TOKEN)
            try:
                with pytest.raises(ProtocolError, match=RULE):
                    await link.handle(Enrollment("../x", private, public), Enroll(DeviceState()))
                await link.handle(Enrollment("site-1", private, public), Enroll(DeviceState()))
            finally:
                await link.close()
            assert [record.client_id for record in parts.clients.list()] == ["site-1"]

    asyncio.run(body())


def test_a_listed_token_enrolls_at_most_max_uses_clients_even_after_a_restart(
    tmp_path: Path,
) -> None:
    tokens = [{"token": "pilot", "max_uses": 3}]

    async def body() -> tuple[list[str], list[str], list[str]]:
        async with (
            served(tmp_path, tokens) as (target, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            racing = await asyncio.gather(
                *(enroll(channel, f"site-{index}", "pilot") for index in range(8))
            )
        async with (  # a restart with the same config and registry
            served(tmp_path, tokens) as (target, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            after = [await enroll(channel, "site-late", "pilot")]
        raised = [{"token": "pilot", "max_uses": 4}]
        async with (
            served(tmp_path, raised) as (target, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            more = [await enroll(channel, name, "pilot") for name in ("site-late", "site-last")]
        return [code for code, _ in racing], [code for code, _ in after], [c for c, _ in more]

    racing, after, more = asyncio.run(body())
    assert sorted(racing) == ["accepted"] * 3 + [RejectCode.BAD_TOKEN.value] * 5
    assert after == [RejectCode.BAD_TOKEN.value]  # the restart gave no use back
    assert more == ["accepted", RejectCode.BAD_TOKEN.value]  # one more use: one more client


def test_a_bare_listed_secret_enrolls_at_most_100_clients(tmp_path: Path) -> None:
    async def body() -> list[tuple[str, str]]:
        async with (
            served(tmp_path, [TOKEN]) as (target, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            return [await enroll(channel, f"phone-{index}", TOKEN) for index in range(101)]

    answers = asyncio.run(body())
    assert [code for code, _ in answers[:100]] == ["accepted"] * 100
    code, detail = answers[100]
    assert code == RejectCode.BAD_TOKEN.value
    assert "used up (all 100 uses taken)" in detail


def test_an_expired_listed_token_enrolls_no_one(tmp_path: Path) -> None:
    expired = datetime.now(UTC) - timedelta(minutes=1)

    async def body() -> tuple[str, str]:
        async with (
            served(tmp_path, [{"token": "late", "expires": expired}]) as (target, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            return await enroll(channel, "site-1", "late")

    code, detail = asyncio.run(body())
    assert code == RejectCode.BAD_TOKEN.value
    assert "expired at" in detail


def test_a_token_removed_from_the_config_stops_working_at_the_next_start(
    tmp_path: Path,
) -> None:
    async def body() -> list[str]:
        codes = []
        for listed, client_id in (([TOKEN, "old"], "site-1"), ([TOKEN], "site-2")):
            async with (
                served(tmp_path, listed) as (target, _),
                grpc.aio.insecure_channel(target) as channel,
            ):
                codes.append((await enroll(channel, client_id, "old"))[0])
        return codes

    assert asyncio.run(body()) == ["accepted", RejectCode.BAD_TOKEN.value]


def test_a_known_client_without_a_key_cannot_be_claimed_without_a_token(tmp_path: Path) -> None:
    """A record enrolled without a key (an operator's bulk enrollment) is no free identity:
    whoever knows its id must still redeem a token to attach a key to it."""

    async def body() -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
        async with (
            served(tmp_path, [TOKEN]) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            parts.clients.enroll("ward-3", DeviceState())  # known, with no key yet
            claimed = await enroll(channel, "ward-3", "guessed")
            redeemed = await enroll(channel, "ward-3", TOKEN)
            stolen = await enroll(channel, "ward-3", TOKEN)  # a second key for it: refused
            return claimed, redeemed, stolen

    claimed, redeemed, stolen = asyncio.run(body())
    assert claimed[0] == RejectCode.BAD_TOKEN.value
    assert redeemed == ("accepted", "")
    assert stolen[0] != "accepted"


def test_online_token_guessing_is_throttled_by_address_and_the_right_guess_waits_too(
    tmp_path: Path,
) -> None:
    """A stranger tries tokens as fast as the service answers (each bad token a verdict of its
    own): a short listed secret fell to it. Past ``coordinator.enrollment_guesses`` bad tokens
    from one address within the window (a used-up one counts: it answers too), that address is
    refused before its token is tried (the right token included, which is then not used up),
    RESOURCE_EXHAUSTED, which the real client's link raises as a failure it retries, until the
    window moves on. An enrolled client rejoining with its key (a restart) tries no token and
    is not held up."""
    secret, spent = "pilot-9f3k", "used-once-token"
    now = [1_000.0]

    async def body() -> dict[str, Any]:
        async with (
            served_job(
                tmp_path,
                run_id=RUN,
                tokens=[secret, {"token": spent, "max_uses": 1}],
                coordinator={"enrollment_guesses": 3, "enrollment_guess_window_s": 60.0},
            ) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            assert parts.service.guesses.clock is time.monotonic  # no stepped wall clock
            parts.service.guesses.clock = lambda: now[0]  # the window, in virtual time
            seen: dict[str, Any] = {}
            link = GrpcLink(target, credentials=None, enrollment_token=secret)
            early = Enrollment("early", *generate_client_key())
            await link.handle(early, Enroll(DeviceState()))
            seen["spent"] = [await enroll(channel, f"used-{i}", spent) for i in range(2)]
            seen["guesses"] = [await enroll(channel, f"g-{i}", f"guess-{i}") for i in range(2)]
            seen["right"] = await enroll(channel, "site-1", secret)
            await link.handle(early, Enroll(DeviceState()))  # rejoining with its key: no token
            private, public = generate_client_key()
            try:
                with pytest.raises(BusyError, match="RESOURCE_EXHAUSTED"):  # retried
                    await link.handle(Enrollment("site-2", private, public), Enroll(DeviceState()))
                now[0] += 59.0
                seen["still"] = await enroll(channel, "site-1", secret)
                now[0] += 1.5  # the first bad token left the window
                seen["after"] = await enroll(channel, "site-1", secret)
                await link.handle(Enrollment("site-2", private, public), Enroll(DeviceState()))
            finally:
                await link.close()
            seen["enrolled"] = sorted(record.client_id for record in parts.clients.list())
            seen["throttled"] = parts.service.refusals["throttled"]
            return seen

    seen = asyncio.run(body())
    assert [code for code, _ in seen["spent"]] == ["accepted", RejectCode.BAD_TOKEN.value]
    assert [detail for _, detail in seen["guesses"]] == ["unknown enrollment token"] * 2
    code, detail = seen["right"]
    assert code == "grpc RESOURCE_EXHAUSTED"
    assert detail == "too many bad enrollment tokens from 127.0.0.1: retry in 60 s"
    assert seen["still"] == ("grpc RESOURCE_EXHAUSTED", detail.replace("60 s", "1 s"))
    assert seen["after"][0] == "accepted"
    assert seen["enrolled"] == ["early", "site-1", "site-2", "used-0"]
    assert seen["throttled"] == 3


@pytest.mark.parametrize("trusted", [True, False])
def test_behind_a_trusted_proxy_each_forwarded_address_guesses_apart(
    tmp_path: Path, trusted: bool
) -> None:
    """Behind a proxy every call comes from the proxy: one guesser locked every client out.
    A proxy in ``coordinator.trusted_proxies`` has its ``x-forwarded-for`` read, so another
    address behind it still enrolls; a peer that is not one has its header ignored, so a
    guesser that names a new address with each call is still one source."""
    secret = "pilot-9f3k"

    async def body() -> list[tuple[str, str]]:
        async with (
            served_job(
                tmp_path,
                run_id=RUN,
                tokens=[secret],
                coordinator={
                    "enrollment_guesses": 2,
                    # untrusted: a proxy is listed, but not the one the calls come from
                    "trusted_proxies": ["127.0.0.0/8"] if trusted else ["10.0.0.0/8"],
                },
            ) as (target, _),
            grpc.aio.insecure_channel(target) as channel,
        ):
            guesses = [
                await enroll(channel, f"g-{i}", f"guess-{i}", forwarded_for="203.0.113.9")
                for i in range(2)
            ]
            # a hop put before the proxy's own is the caller's word, not the proxy's
            guesses.append(
                await enroll(channel, "g-9", "guess-9", forwarded_for="198.51.100.1, 203.0.113.9")
            )
            other = await enroll(channel, "site-1", secret, forwarded_for="203.0.113.77")
            return [*guesses, other]

    codes = [code for code, _ in asyncio.run(body())]
    refused = "grpc RESOURCE_EXHAUSTED"
    if trusted:
        assert codes == ["bad_token", "bad_token", refused, "accepted"]
    else:
        assert codes == ["bad_token", "bad_token", refused, refused]


def test_grpc_s_ipv6_peers_count_as_their_64_block() -> None:
    """gRPC writes an IPv6 peer percent-encoded (``ipv6:%5B...%5D:port``): read as it was,
    every address of a machine's /64 was a source of its own."""
    assert guess_source("ipv6:%5B2001:db8:1:2::7%5D:443") == "2001:db8:1:2::/64"
    assert guess_source("ipv6:%5B2001:db8:1:2:ffff::1%5D:9") == "2001:db8:1:2::/64"
    assert guess_source("ipv4:10.0.0.7:5123") == "10.0.0.7"


@pytest.mark.parametrize(
    ("hop", "source"),
    [
        ("203.0.113.9:40001", "203.0.113.9"),  # a port: each connection was a source
        ("[2001:db8::1]:40001", "2001:db8::/64"),
        ("2001:db8::1", "2001:db8::/64"),
        ("not-an-address", "127.0.0.1"),  # no address: the proxy's own count
        ("203.0.113.9, unknown", "127.0.0.1"),
    ],
)
def test_a_forwarded_hop_counts_by_its_address_alone(hop: str, source: str) -> None:
    trusted = trusted_networks(["127.0.0.0/8"])
    assert guess_source("ipv4:127.0.0.1:5", [("x-forwarded-for", hop)], trusted) == source
