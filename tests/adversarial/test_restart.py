"""A restarted coordinator resumes at once: its first round starts with the next check-ins.

The coordinator is the one ``shoal coordinator serve`` builds (registries,
run layer, driver, gRPC service), run in virtual time: its check-ins are
signed requests handed to the service, and ten minutes of outage pass in
no time. Before the fix, check-ins were written to the registry only every
1,000 of them, and candidates had to have been seen within 2 minutes: after
the restart, two clients checking in every second waited about 8 minutes
for their first round.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from shoal.config import Config, parse_config
from shoal.coordinator.server import CoordinatorParts, build
from shoal.core import DeviceState
from shoal.transport import serde
from shoal.transport.messages import EnrollmentRequest, RetryAfter, Task
from shoal.transport.signing import generate_client_key
from support.jobs import network_job
from support.virtual_time import run_in_virtual_time

RUN, TOKEN = "restart", "let-me-in"
PHONES = {f"phone-{index}": generate_client_key() for index in range(2)}
EPOCH = 1_800_000_000.0  # the virtual clock reads as seconds since the epoch (in 2027)
OUTAGE_S = 600.0


def job(tmp_path: Path) -> Config:
    return parse_config(
        network_job(
            tmp_path,
            run_id=RUN,
            token=TOKEN,
            clients=2,
            per_round=2,
            run={"name": RUN, "rounds": 3},
            round={"quorum": 1.0, "deadline_s": 60.0},
            coordinator={"retry_after_s": 1.0},
        )
    )


def now() -> float:
    return asyncio.get_running_loop().time()


class Peer:
    """The little of a gRPC servicer context that the service reads (for its refusal log)."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()  # no proxy's x-forwarded-for


def signed(message: Any, client_id: str) -> bytes:
    """The bytes of ``message`` signed by ``client_id``, as they arrive at the service."""
    private, _ = PHONES[client_id]
    serde.sign_message(message, private, client_id=client_id, run_id=RUN, round=-1, timestamp=now())
    return bytes(message.SerializeToString())


async def enroll(parts: CoordinatorParts, client_id: str) -> None:
    request = serde.encode_enroll_request(
        EnrollmentRequest(DeviceState(), PHONES[client_id][1], TOKEN)
    )
    response = await parts.service.Enroll(signed(request, client_id), Peer())  # type: ignore[arg-type]
    reply = serde.decode_enroll_response(response)
    assert reply.verdict.accepted, reply.verdict.detail


async def check_in(parts: CoordinatorParts, client_id: str) -> object:
    request = serde.encode_check_in_request(DeviceState())
    response = await parts.service.CheckIn(signed(request, client_id), Peer())  # type: ignore[arg-type]
    return serde.decode_check_in_response(response)


async def life(config: Config, *, enrolling: bool, seconds: int) -> list[dict[str, object]]:
    """One life of the coordinator: the phones check in every second; then kill -9.

    Returns what each second's check-ins were answered. Nothing is flushed or
    closed gracefully at the end (only the database file and the holds on the state
    folder and the model are let go, as the OS lets them go).
    """
    parts = build(config, clock=now)
    job = asyncio.create_task(parts.driver.run())
    answers = []
    try:
        if enrolling:
            for client_id in PHONES:
                await enroll(parts, client_id)
        for _ in range(seconds):
            answers.append({client_id: await check_in(parts, client_id) for client_id in PHONES})
            await asyncio.sleep(1.0)
    finally:
        job.cancel()  # kill -9: no graceful stop, no flush of what was buffered
        await asyncio.gather(job, return_exceptions=True)
        parts.database.close()
        assert parts.records.hold is not None and parts.records.held is not None
        # as the OS lets a killed process's holds on its folder and its model go
        parts.records.hold.release()
        parts.records.held.release()
    return answers


def first_task(answers: list[dict[str, object]]) -> int | None:
    """The second (counted from 1) at which every phone was offered a task, if ever."""
    for second, answered in enumerate(answers, start=1):
        if all(isinstance(answer, Task) for answer in answered.values()):
            return second
    return None


def test_the_first_round_after_a_restart_starts_with_the_next_check_ins(tmp_path: Path) -> None:
    config = job(tmp_path)

    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        before = await life(config, enrolling=True, seconds=5)
        await asyncio.sleep(OUTAGE_S)  # the coordinator is down; the phones keep trying
        after = await life(config, enrolling=False, seconds=30)
        return before, after

    before, after = run_in_virtual_time(scenario(), start=EPOCH)
    assert first_task(before) is not None  # round 1 was under way when the coordinator died
    # the first check-ins after the restart make the phones candidates; the round starts, and
    # their next check-ins (a second later) get its task
    assert all(isinstance(answer, RetryAfter) for answer in after[0].values())
    assert first_task(after) == 2, [sorted(type(a).__name__ for a in s.values()) for s in after]
    task = next(iter(after[1].values()))
    assert isinstance(task, Task) and task.round == 1  # round 1 is replayed, never skipped
