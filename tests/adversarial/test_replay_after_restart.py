"""A request captured before a coordinator's restart is refused after it, as before it.

Reproduced before the fix: the replay guard held its nonces in memory only, so a
heartbeat or an enrollment recorded off the wire and sent again to the
restarted coordinator, within the 300 s window, was accepted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from shoal.core import DeviceState
from shoal.transport import serde
from shoal.transport._generated import coordinator_pb2 as pb
from shoal.transport.messages import EnrollmentRequest
from support.peers import Peer, served

pytestmark = pytest.mark.timeout(120)

RUN = "run-restart"
TOKEN = "fleet-secret"


def code(verdict: pb.Verdict) -> str:
    return "accepted" if verdict.accepted else serde.decode_reject_code(verdict.code).value


def test_a_request_captured_before_a_restart_is_refused_after_it(tmp_path: Path) -> None:
    async def body() -> dict[str, str]:
        async with (
            served(tmp_path, run_id=RUN, tokens=[TOKEN]) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            peer = Peer(channel, "site-1", run_id=RUN)
            enrollment = peer.signed(
                serde.encode_enroll_request(EnrollmentRequest(DeviceState(), peer.public, TOKEN))
            )
            enrolled = await peer.unary("Enroll", enrollment, pb.EnrollResponse)
            beat = peer.signed(pb.HeartbeatRequest(device=serde.encode_device_state(DeviceState())))
            first = await peer.unary("Heartbeat", beat, pb.HeartbeatResponse)
            # on disk while the coordinator runs: a kill -9 now would not lose it
            kept = parts.records.folder / "replay-nonces.bin"
            journal = kept.read_bytes() if kept.exists() else b""
        on_disk = beat.auth.nonce in journal and enrollment.auth.nonce in journal
        async with (
            served(tmp_path, run_id=RUN, tokens=[TOKEN]) as (target, parts),
            grpc.aio.insecure_channel(target) as channel,
        ):
            peer.channel = channel
            replayed_beat = await peer.unary("Heartbeat", beat, pb.HeartbeatResponse)
            replayed_enrollment = await peer.unary("Enroll", enrollment, pb.EnrollResponse)
            fresh = await peer.heartbeat()
        return {
            "enrolled": code(enrolled.verdict),
            "first": code(first.verdict),
            "on disk": str(on_disk),
            "replayed heartbeat": code(replayed_beat.verdict),
            "replayed enrollment": code(replayed_enrollment.verdict),
            "fresh": code(fresh.verdict),
        }

    assert asyncio.run(body()) == {
        "enrolled": "accepted",
        "first": "accepted",
        "on disk": "True",
        "replayed heartbeat": "replayed",
        "replayed enrollment": "replayed",
        "fresh": "accepted",
    }
