"""The heartbeat buffer on every backend: writes by count, by time on its clock, from threads."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime, timedelta

import pytest

from shoal.core import RegistryError
from shoal.registry import ClientRegistry, Database, DeviceState, Heartbeat, HeartbeatBuffer

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)


def device() -> DeviceState:
    return DeviceState(battery_level=0.8, charging=True, wifi=True)


def heartbeat(client_id: str, *, seconds: float) -> Heartbeat:
    return Heartbeat(
        client_id=client_id,
        seen_at=NOW + timedelta(seconds=seconds),
        battery_level=0.5,
        charging=False,
        wifi=False,
    )


class ManualClock:
    """A clock that moves only when the test says."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(database: Database) -> ClientRegistry:
    return ClientRegistry(database, seed=7)


def test_the_buffer_flushes_when_full_and_on_request(registry: ClientRegistry) -> None:
    for index in range(5):
        registry.enroll(f"c{index}", device(), now=NOW)
    buffer = HeartbeatBuffer(registry, max_items=3, max_age_s=3600.0, clock=ManualClock())
    assert buffer.add(heartbeat("c4", seconds=1)) == 1  # the first one is written at once
    assert buffer.add(heartbeat("c0", seconds=1)) == 0
    assert buffer.add(heartbeat("c1", seconds=1)) == 0
    assert registry.get("c0").last_seen == NOW  # nothing written yet
    assert buffer.add(heartbeat("c2", seconds=1)) == 3
    assert len(buffer) == 0 and registry.get("c0").last_seen == NOW + timedelta(seconds=1)
    with buffer:
        buffer.add(heartbeat("c3", seconds=2))
    assert len(buffer) == 0 and registry.get("c3").last_seen == NOW + timedelta(seconds=2)
    assert buffer.flush() == 0
    assert buffer.flushed == 5
    with pytest.raises(RegistryError):
        HeartbeatBuffer(registry, max_items=0)


def test_the_buffer_flushes_by_time_on_its_clock(registry: ClientRegistry) -> None:
    # two clients checking in every second fill 1,000 items in 8 minutes: by count alone,
    # their sightings stayed unwritten that long, and they aged out of the selection
    for index in range(3):
        registry.enroll(f"c{index}", device(), now=NOW)
    clock = ManualClock()
    buffer = HeartbeatBuffer(registry, max_items=1000, max_age_s=1.0, clock=clock)
    assert buffer.add(heartbeat("c0", seconds=1)) == 1  # nothing written for a while: at once
    clock.now += 0.25
    assert buffer.add(heartbeat("c1", seconds=2)) == 0  # at most one write a second
    clock.now += 0.5
    assert buffer.add(heartbeat("c2", seconds=3)) == 0
    assert registry.get("c1").last_seen == NOW and len(buffer) == 2
    clock.now += 0.25  # a second since the last write
    assert buffer.add(heartbeat("c1", seconds=4)) == 2
    assert registry.get("c1").last_seen == NOW + timedelta(seconds=4)
    assert registry.get("c2").last_seen == NOW + timedelta(seconds=3)
    clock.now -= 3600  # the clock went back: never wait an hour for the next write
    assert buffer.add(heartbeat("c0", seconds=5)) == 1
    assert len(buffer) == 0 and buffer.flushed == 5
    for max_age_s in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(RegistryError, match="max_age_s"):
            HeartbeatBuffer(registry, max_age_s=max_age_s)


def test_the_buffer_takes_heartbeats_from_many_threads(registry: ClientRegistry) -> None:
    clients = [f"c{index}" for index in range(40)]
    for client_id in clients:
        registry.enroll(client_id, device(), now=NOW)
    buffer = HeartbeatBuffer(registry, max_items=16)

    def send(offset: int) -> None:
        for step in range(25):
            client_id = clients[(offset * 25 + step) % len(clients)]
            buffer.add(heartbeat(client_id, seconds=offset * 100 + step + 1))

    threads = [threading.Thread(target=send, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    buffer.flush()
    assert buffer.flushed == 100 and len(buffer) == 0
    assert all(record.last_seen > NOW for record in registry.list())
