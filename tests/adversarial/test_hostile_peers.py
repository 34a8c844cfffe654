"""Hostile peers of a served coordinator over real gRPC: lockouts, probes, foreign tensors.

Each attack was reproduced against the coordinator before its fix:

- A stranger's enrollments that named an enrolled client's id, each signed
  with the stranger's own key, put their nonces in that client's share of the
  replay guard (4,096 requests in 300 s): the client's own check-ins were then
  refused as replayed, for as long as the stranger kept it up. Tokenless
  enrollments under new ids grew the guard without bound.
- Whether a client was suspended, and whether an id was enrolled (a forged
  request of an enrolled id was ``bad_signature``, of a free one
  ``unknown_client``), was told to anyone who named it.
- A download from past the model's end, and an upload whose layout had an
  infinite dimension, nesting deeper than the JSON parser's recursion or a
  dtype numpy parses as Python (","),
  raised out of the service (gRPC UNKNOWN, a traceback, nothing counted).
- An update whose tensors were not the model's (another order, another dtype)
  was flattened by its own layout and aggregated: its values landed in other
  tensors' places.
- A client outside the round, or a cohort member on parallel streams, had
  up to ``max_update_bytes`` held in memory per stream before the round
  looked at who sent it; a stream that stalled held its bytes, and its
  client's turn to upload, until its connection ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import safetensors.numpy

from shoal.coordinator.server import CoordinatorParts
from shoal.core import Parameters, SecurityError
from shoal.registry import ClientStatus
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.messages import EvaluationReport
from shoal.transport.signing import ReplayGuard, generate_client_key
from support.peers import Peer, chunks_of, served

pytestmark = pytest.mark.timeout(120)

RUN = "run-hostile"
TOKEN = "fleet-secret"


def one_round(
    tmp_path: Path, *, clients: int, **sections: dict[str, Any]
) -> AbstractAsyncContextManager[tuple[str, CoordinatorParts]]:
    """A served run of one fit round that picks one of ``clients`` and waits for it."""
    return served(
        tmp_path,
        run_id=RUN,
        tokens=[TOKEN],
        clients=clients,
        per_round=1,
        drive=True,
        run={"rounds": 1},
        round={"quorum": 1.0, "deadline_s": 60},
        **sections,
    )


def code(verdict: pb.Verdict) -> str:
    """``accepted``, or the verdict's reject code."""
    return "accepted" if verdict.accepted else serde.decode_reject_code(verdict.code).value


def test_a_stranger_naming_a_client_cannot_lock_it_out_or_fill_the_guard(tmp_path: Path) -> None:
    async def body() -> tuple[list[str], list[pb.Verdict], list[str], int, list[str]]:
        async with (
            # (its 24 bad tokens from one address are more than the guess throttle lets by)
            served(
                tmp_path, run_id=RUN, tokens=[TOKEN], coordinator={"enrollment_guesses": 100}
            ) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            guard = parts.service.admission.replay = ReplayGuard(max_per_client=8)
            victim = Peer(channel, "hospital-7", run_id=RUN)
            assert (await victim.enroll(TOKEN)).verdict.accepted
            held = len(guard)
            mallory = generate_client_key()
            as_victim = Peer(channel, "hospital-7", run_id=RUN, key=mallory)
            tokenless = [code((await as_victim.enroll("a guess")).verdict) for _ in range(12)]
            with_token = [(await as_victim.enroll(TOKEN)).verdict for _ in range(12)]
            new_ids = [
                code((await Peer(channel, f"new-{index}", run_id=RUN).enroll("a guess")).verdict)
                for index in range(12)
            ]
            grown = len(guard) - held
            beats = [code((await victim.heartbeat()).verdict) for _ in range(7)]
        return tokenless, with_token, new_ids, grown, beats

    tokenless, with_token, new_ids, grown, beats = asyncio.run(body())
    # without a token, an enrolled id and a free one get the same answer: nothing to enumerate
    assert tokenless == new_ids == ["bad_token"] * 12
    # a token holder learns that the id is taken, and that is all it gets
    assert {code(verdict) for verdict in with_token} == {"bad_signature"}
    assert "enrolled with another public key" in with_token[0].detail
    assert grown == 0  # none of the 36 requests was remembered: none was any client's
    assert beats == ["accepted"] * 7  # with its enrollment, the victim's whole share of 8


def test_a_clients_status_is_told_only_to_its_keys_holder(tmp_path: Path) -> None:
    async def body() -> tuple[str, str, str]:
        async with (
            served(tmp_path, run_id=RUN, tokens=[TOKEN]) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            clinic = Peer(channel, "clinic-2", run_id=RUN)
            assert (await clinic.enroll(TOKEN)).verdict.accepted
            parts.clients.set_status("clinic-2", ClientStatus.SUSPENDED, "under review")
            stranger = Peer(channel, "clinic-2", run_id=RUN)
            unknown = Peer(channel, "nobody", run_id=RUN)
            answers = [await peer.check_in() for peer in (stranger, clinic, unknown)]
        strangers, own, nobodys = (
            str(serde.decode_check_in_response(answer).code.value)  # type: ignore[union-attr]
            for answer in answers
        )
        return strangers, own, nobodys

    strangers, own, nobodys = asyncio.run(body())
    # not "suspended", nor anything that tells an enrolled id from a free one: the stranger
    # holds no key of it (before, an enrolled id's forged request was "bad_signature")
    assert strangers == nobodys == "unknown_client"
    assert own == "suspended"


def test_a_download_past_the_models_end_is_refused_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def body() -> tuple[grpc.aio.AioRpcError, bytes, int, str]:
        async with (
            served(tmp_path, run_id=RUN, tokens=[TOKEN]) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            peer = Peer(channel, "site-1", run_id=RUN)
            assert (await peer.enroll(TOKEN)).verdict.accepted
            sha, data = parts.service.model_bytes.current()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await peer.fetch(sha, offset=len(data) + 1)
            tail = await peer.fetch(sha, offset=len(data))  # the end itself: nothing left
            return (
                refused.value,
                tail,
                parts.service.refusals["malformed"],
                code((await peer.heartbeat()).verdict),
            )

    refused, tail, counted, still = asyncio.run(body())
    assert refused.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (refused.details() or "").startswith("malformed: offset")
    assert tail == b""
    assert counted == 1
    assert still == "accepted"
    assert "Traceback" not in caplog.text


def foreign(arrays: dict[str, np.ndarray], layout: str) -> bytes:
    """A safetensors payload of ``arrays`` whose Shoal layout says ``layout``."""
    return safetensors.numpy.save(arrays, metadata={"format": "shoal", "shoal.layout": layout})


def test_an_update_of_other_tensors_than_the_models_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model's tensors swapped (the bias first) and widened to float64: before, its values
    were flattened in the payload's own order and aggregated into the model's weights."""
    caplog.set_level(logging.INFO)

    async def body() -> tuple[dict[str, pb.Verdict], dict[str, int]]:
        async with (
            one_round(tmp_path, clients=1) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            peer = Peer(channel, "site-1", run_id=RUN)
            assert (await peer.enroll(TOKEN)).verdict.accepted
            task = await peer.task()
            model = Parameters.from_bytes(await peer.fetch(task.model.sha256))
            views = model.views()
            arrays = {name: np.zeros_like(views[name], np.float64) for name in reversed(views)}
            layout = (
                "["
                + ",".join(
                    f'["{name}",{list(array.shape)},"float64"]' for name, array in arrays.items()
                )
                + "]"
            )
            size = len(model)
            payloads = {
                "swapped": foreign(arrays, layout.replace(" ", "")),
                "infinite dimension": foreign(
                    {"w": np.zeros(size, np.float32)}, '[["w",[1e400],"float32"]]'
                ),
                "deep nesting": foreign(
                    {"w": np.zeros(size, np.float32)}, "[" * 100_000 + "]" * 100_000
                ),
                # numpy reads "," through Python's parser: a SyntaxError raised out of the service
                "a structured dtype": foreign(
                    {"w": np.zeros(size, np.float32)}, f'[["w",[{size}],","]]'
                ),
                "the model's own": model.with_vector(np.zeros(size, np.float32)).to_bytes(),
            }
            verdicts = {}
            for name, payload in payloads.items():
                response = await peer.upload(peer.update_header(task, payload), chunks_of(payload))
                verdicts[name] = response.verdict
            return verdicts, dict(parts.service.refusals)

    verdicts, refusals = asyncio.run(body())
    swapped = verdicts["swapped"]
    assert code(swapped) == "invalid_update"
    assert swapped.detail.startswith("not the model's tensors: tensor 0 is ")
    assert "float64 where" in swapped.detail
    assert code(verdicts["infinite dimension"]) == "malformed"
    assert code(verdicts["deep nesting"]) == "malformed"
    assert "malformed layout" in verdicts["deep nesting"].detail
    assert code(verdicts["a structured dtype"]) == "malformed"
    assert "not a number's" in verdicts["a structured dtype"].detail
    assert code(verdicts["the model's own"]) == "accepted"  # the refused ones did not count
    assert refusals == {"invalid_update": 1, "malformed": 3}
    assert "Traceback" not in caplog.text


async def stalled(payload: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    """The first chunk of ``payload``, then nothing until ``release``, then the rest."""
    parts = [part async for part in chunks_of(payload, chunk_size=1024)]
    assert len(parts) > 1
    yield parts[0]
    await release.wait()
    for part in parts[1:]:
        yield part


def test_no_one_holds_memory_with_an_upload_the_round_would_refuse(tmp_path: Path) -> None:
    """An upload is screened before its bytes are taken in: a client outside the round is
    answered at its header (before, the service kept reading the stalled stream until the
    caller's deadline), and a cohort member has one upload under way at a time."""

    async def body() -> dict[str, str]:
        async with (
            one_round(tmp_path, clients=2) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            peers = [Peer(channel, f"site-{index}", run_id=RUN) for index in range(2)]
            for peer in peers:
                assert (await peer.enroll(TOKEN)).verdict.accepted
            task = None
            while task is None:
                for peer in peers:
                    answer = await peer.check_in()
                    if answer.WhichOneof("outcome") == "task":
                        task, chosen = answer.task, peer
                await asyncio.sleep(0.05)
            other = next(peer for peer in peers if peer is not chosen)
            model = parts.driver.coordinator.parameters
            payload = model.with_vector(np.zeros(len(model), np.float32)).to_bytes()
            never = asyncio.Event()
            outsider = await asyncio.wait_for(
                other.upload(other.update_header(task, payload), stalled(payload, never)), 10
            )
            release = asyncio.Event()
            first = asyncio.create_task(
                chosen.upload(chosen.update_header(task, payload), stalled(payload, release))
            )
            await asyncio.sleep(0.5)  # its header and first chunk are in
            second = await asyncio.wait_for(
                chosen.upload(chosen.update_header(task, payload), chunks_of(payload)), 10
            )
            release.set()
            return {
                "outsider": code(outsider.verdict),
                "second stream": code(second.verdict),
                "first stream": code((await first).verdict),
            }

    assert asyncio.run(body()) == {
        "outsider": "not_selected",
        "second stream": "duplicate",
        "first stream": "accepted",
    }


def test_a_stalled_upload_is_dropped_and_its_client_can_upload_again(tmp_path: Path) -> None:
    """A cohort member whose upload stops after its first chunk held those bytes, and its
    turn to upload (every later stream of it was a duplicate), until its connection ended:
    now the stream is dropped once no part arrives for ``upload_idle_s``, and so is a
    stream that stalls before its header."""

    async def body() -> dict[str, str]:
        async with (
            one_round(tmp_path, clients=1, coordinator={"upload_idle_s": 0.5}) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            service = parts.service
            peer = Peer(channel, "site-0", run_id=RUN)
            assert (await peer.enroll(TOKEN)).verdict.accepted
            task = await peer.task()
            model = parts.driver.coordinator.parameters
            payload = model.with_vector(np.zeros(len(model), np.float32)).to_bytes()
            never = asyncio.Event()
            stalled_upload = await asyncio.wait_for(
                peer.upload(peer.update_header(task, payload), stalled(payload, never)), 10
            )
            held = sorted(service._uploading)

            async def nothing() -> AsyncIterator[bytes]:
                await never.wait()
                yield b""

            silent = service.SubmitUpdate(nothing(), _Context())
            silent_verdict = (await asyncio.wait_for(silent, 10)).verdict
            again = await asyncio.wait_for(
                peer.upload(peer.update_header(task, payload), chunks_of(payload)), 10
            )
            return {
                "stalled": code(stalled_upload.verdict),
                "detail": stalled_upload.verdict.detail,
                "held after": ",".join(held) or "none",
                "no header": code(silent_verdict),
                "again": code(again.verdict),
            }

    assert asyncio.run(body()) == {
        "stalled": "late",
        "detail": "no part of the upload arrived for 0.5 s: it is dropped",
        "held after": "none",
        "no header": "late",
        "again": "accepted",
    }


class _Context:
    """What the service asks of a call's context when it refuses one."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()  # no proxy's x-forwarded-for


def test_an_evaluation_of_another_model_is_refused(tmp_path: Path) -> None:
    """An evaluation names the model it evaluated, as an update names its base: one of another
    model was taken before (its sha256 was read and never compared)."""

    async def body() -> tuple[str, str, str]:
        async with (
            one_round(tmp_path, clients=1, evaluation={"every": 1, "clients": 1}) as (
                target,
                parts,
            ),
            grpc.aio.insecure_channel(target) as channel,
        ):
            peer = Peer(channel, "site-1", run_id=RUN)
            assert (await peer.enroll(TOKEN)).verdict.accepted
            fit = await peer.task()
            model = parts.driver.coordinator.parameters
            payload = model.with_vector(np.full(len(model), 1e-3, np.float32)).to_bytes()
            trained = await peer.upload(peer.update_header(fit, payload), chunks_of(payload))
            evaluate = await peer.task()
            while evaluate.phase != pb.PHASE_EVALUATE:
                await asyncio.sleep(0.05)
                evaluate = await peer.task()

            async def report(sha256: str) -> str:
                message = serde.encode_evaluation_report(
                    EvaluationReport(evaluate.round, RUN, 0.5, 10, sha256)
                )
                peer.signed(message, round_number=evaluate.round)
                response = await peer.unary(
                    "ReportEvaluation", message, pb.ReportEvaluationResponse
                )
                return code(response.verdict)

            assert fit.model.sha256 != evaluate.model.sha256  # round 1 committed a new model
            other = await report(fit.model.sha256)  # the model it trained, not the one it got
            own = await report(evaluate.model.sha256)
            return code(trained.verdict), other, own

    assert asyncio.run(body()) == ("accepted", "wrong_model_hash", "accepted")


def test_an_enrollment_that_loses_its_id_keeps_its_token_use(tmp_path: Path) -> None:
    """Two coordinators on one registry: the other one enrolls the id with another key after
    this one redeemed the token and before it enrolls. The registry refuses the enrollment (a
    known id with another key) and the token use, taken in the same transaction, is given
    back; before, it was gone for good."""

    async def body() -> tuple[str, int, int, int]:
        async with (
            served(tmp_path, run_id=RUN, tokens=[{"token": TOKEN, "max_uses": 3}]) as (
                target,
                parts,
            ),
            grpc.aio.insecure_channel(target) as channel,
        ):
            tokens = parts.service.admission.tokens
            (listed,) = tokens.list()

            def taken(client_id: str, *args: Any, **kwargs: Any) -> Any:
                raise SecurityError(f"client {client_id!r} is enrolled with another public key")

            parts.service.clients.enroll = taken  # type: ignore[method-assign]
            verdict = (await Peer(channel, "site-9", run_id=RUN).enroll(TOKEN)).verdict
            return (
                code(verdict),
                listed.uses_left,
                tokens.get(listed.token_id).uses_left,
                parts.clients.count(),
            )

    refused, before, after, enrolled = asyncio.run(body())
    assert refused == "bad_signature"
    assert after == before == 3
    assert enrolled == 0
