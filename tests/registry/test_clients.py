"""The client registry on every backend: enrollment, status, heartbeats, listings."""

from __future__ import annotations

import math
import random
import threading
from datetime import UTC, datetime, timedelta

import pytest

from shoal.core import NotFoundError, ProtocolError, RegistryError, SecurityError
from shoal.registry import (
    ClientRegistry,
    ClientStatus,
    Component,
    Database,
    DeviceState,
    Eligibility,
    Heartbeat,
)

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))


def device(**changes: object) -> DeviceState:
    fields: dict[str, object] = {
        "device_class": "high-end-android",
        "battery_level": 0.8,
        "charging": True,
        "wifi": True,
        "ram_gb": 4.0,
        "app_version": "2.4.1",
        "runtime_version": "1.2.0",
        "model_architecture_version": "mobilenet-v3",
        "feature_extractor_version": "1.0",
    }
    fields.update(changes)
    return DeviceState(**fields)  # type: ignore[arg-type]


def heartbeat(client_id: str, *, seconds: float, **changes: object) -> Heartbeat:
    fields: dict[str, object] = {"battery_level": 0.5, "charging": False, "wifi": False}
    fields.update(changes)
    return Heartbeat(
        client_id=client_id,
        seen_at=NOW + timedelta(seconds=seconds),
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
def registry(database: Database) -> ClientRegistry:
    return ClientRegistry(database, seed=7)


def test_an_empty_registry(registry: ClientRegistry) -> None:
    assert registry.list() == []
    assert registry.count() == 0
    assert registry.record_heartbeats([]) == 0
    with pytest.raises(NotFoundError):
        registry.get("nobody")


def test_enroll_stores_the_whole_record(registry: ClientRegistry) -> None:
    expiry = NOW + timedelta(days=30)
    record = registry.enroll("uuid-5521", device(), now=NOW, public_key=KEY_A, expires_at=expiry)
    assert record == registry.get("uuid-5521")
    assert record.device == device()
    assert record.status is ClientStatus.ACTIVE and record.status_reason is None
    assert record.eligibility == Eligibility(True)
    assert record.public_key == KEY_A
    assert record.enrolled_at == record.last_seen == NOW
    assert record.expires_at == expiry
    assert record.last_seen.tzinfo is not None
    assert 0 <= record.sample_key < 2**63


def test_reenrolling_updates_the_device_but_keeps_identity(registry: ClientRegistry) -> None:
    first = registry.enroll("c1", device(), now=NOW)
    registry.set_status("c1", ClientStatus.SUSPENDED, "flaky")
    later = NOW + timedelta(hours=1)
    again = registry.enroll("c1", device(app_version="2.10.0", ram_gb=8.0), now=later)
    assert again.sample_key == first.sample_key
    assert again.enrolled_at == NOW and again.last_seen == later
    assert again.device.app_version == "2.10.0" and again.device.ram_gb == 8.0
    assert again.status is ClientStatus.SUSPENDED  # re-enrolling never lifts a suspension
    assert registry.enroll("c1", device(app_version="2.10.0", ram_gb=8.0), now=later) == again
    assert registry.count() == 1


def test_reenrolling_never_moves_last_seen_back(registry: ClientRegistry) -> None:
    registry.enroll("c1", device(), now=NOW)
    assert registry.enroll("c1", device(), now=NOW - timedelta(hours=1)).last_seen == NOW


def test_public_keys_can_be_added_but_not_swapped(registry: ClientRegistry) -> None:
    registry.enroll("c1", device(), now=NOW)
    assert registry.enroll("c1", device(), now=NOW, public_key=KEY_A).public_key == KEY_A
    assert registry.enroll("c1", device(), now=NOW).public_key == KEY_A
    with pytest.raises(SecurityError, match="another public key"):
        registry.enroll("c1", device(), now=NOW, public_key=KEY_B)
    with pytest.raises(RegistryError, match="32 bytes"):
        registry.enroll("c2", device(), now=NOW, public_key=b"short")


def test_a_retired_client_cannot_enroll_again(registry: ClientRegistry) -> None:
    registry.enroll("c1", device(), now=NOW)
    registry.set_status("c1", ClientStatus.RETIRED, "lost phone")
    with pytest.raises(RegistryError, match="retired"):
        registry.enroll("c1", device(), now=NOW)


TRANSITIONS = [
    (ClientStatus.ACTIVE, ClientStatus.ACTIVE, True),
    (ClientStatus.ACTIVE, ClientStatus.SUSPENDED, True),
    (ClientStatus.ACTIVE, ClientStatus.RETIRED, True),
    (ClientStatus.SUSPENDED, ClientStatus.ACTIVE, True),
    (ClientStatus.SUSPENDED, ClientStatus.SUSPENDED, True),
    (ClientStatus.SUSPENDED, ClientStatus.RETIRED, True),
    (ClientStatus.RETIRED, ClientStatus.ACTIVE, False),
    (ClientStatus.RETIRED, ClientStatus.SUSPENDED, False),
    (ClientStatus.RETIRED, ClientStatus.RETIRED, True),
]


@pytest.mark.parametrize(("start", "target", "allowed"), TRANSITIONS)
def test_every_status_transition(
    registry: ClientRegistry, start: ClientStatus, target: ClientStatus, allowed: bool
) -> None:
    registry.enroll("c1", device(), now=NOW)
    registry.set_status("c1", start, "setup")
    if allowed:
        record = registry.set_status("c1", target, "because")
        assert (record.status, record.status_reason) == (target, "because")
    else:
        with pytest.raises(RegistryError, match="cannot become"):
            registry.set_status("c1", target, "because")
        assert registry.get("c1").status is start


def test_a_profile_is_what_the_record_says_of_status_class_and_versions(
    registry: ClientRegistry,
) -> None:
    """The policy reads a client's profile, not its whole record: the two must agree."""
    registry.enroll("c1", device(), now=NOW)
    registry.enroll("c2", device(device_class="laptop", feature_extractor_version=None), now=NOW)
    registry.set_status("c2", ClientStatus.SUSPENDED, "poisoned")
    profiles = registry.profiles(["c2", "c1", "nobody", "c1"])
    assert sorted(profiles) == ["c1", "c2"]
    for client_id, profile in profiles.items():
        record = registry.get(client_id)
        assert profile.client_id == client_id
        assert profile.status is record.status
        assert profile.device_class == record.device.device_class
        for component in Component:
            column = component.column
            assert getattr(profile, column) == getattr(record.device, column)
    assert profiles["c2"].status is ClientStatus.SUSPENDED
    assert profiles["c2"].feature_extractor_version is None
    assert registry.profiles([]) == {}


def test_status_of_an_unknown_client(registry: ClientRegistry) -> None:
    with pytest.raises(NotFoundError):
        registry.set_status("ghost", ClientStatus.SUSPENDED)
    with pytest.raises(NotFoundError):
        registry.record_eligibility("ghost", Eligibility(True))


def test_the_verdict_a_client_was_told_is_kept(registry: ClientRegistry) -> None:
    registry.enroll("c1", device(), now=NOW)
    verdict = Eligibility(False, "app version 2.3.0 is below the minimum 2.4.0")
    registry.record_eligibility("c1", verdict)
    assert registry.get("c1").eligibility == verdict


def test_facts_a_client_did_not_report_stay_unknown(registry: ClientRegistry) -> None:
    """A server reports no battery, charging, WiFi or RAM: none is made up for it."""
    assert DeviceState() == DeviceState(battery_level=None, charging=None, wifi=None, ram_gb=None)
    registry.enroll("server-1", DeviceState(device_class="server"), now=NOW)
    facts = registry.get("server-1").device
    assert (facts.battery_level, facts.charging, facts.wifi, facts.ram_gb) == (None,) * 4
    registry.record_heartbeats([heartbeat("server-1", seconds=10, battery_level=None, wifi=True)])
    facts = registry.get("server-1").device
    assert (facts.battery_level, facts.charging, facts.wifi) == (None, False, True)
    registry.enroll("server-1", DeviceState(device_class="server", ram_gb=64.0), now=NOW)
    assert registry.get("server-1").device.ram_gb == 64.0
    registry.enroll("server-1", DeviceState(device_class="server"), now=NOW)
    assert registry.get("server-1").device.ram_gb is None  # it stopped saying: unknown again


def test_a_barred_client_can_never_train_whatever_it_was_told(registry: ClientRegistry) -> None:
    registry.enroll("c1", device(), now=NOW, expires_at=NOW + timedelta(hours=1))
    assert registry.get("c1").current_eligibility(now=NOW) == Eligibility(True)
    registry.set_status("c1", ClientStatus.SUSPENDED, "stolen")
    suspended = registry.get("c1")
    assert suspended.eligibility == Eligibility(True)  # the verdict last told, kept as it was
    assert suspended.current_eligibility(now=NOW) == Eligibility(
        False, "client is suspended: stolen"
    )
    registry.set_status("c1", ClientStatus.ACTIVE)
    told = Eligibility(False, "app version 2.3.0 is below the minimum 2.4.0")
    registry.record_eligibility("c1", told)
    assert registry.get("c1").current_eligibility(now=NOW) == told
    later = NOW + timedelta(hours=2)
    assert registry.get("c1").current_eligibility(now=later) == Eligibility(
        False, f"enrollment expired at {(NOW + timedelta(hours=1)).isoformat()}"
    )
    registry.set_status("c1", ClientStatus.RETIRED)
    assert registry.get("c1").current_eligibility(now=NOW) == Eligibility(
        False, "client is retired"
    )


def test_list_filters_and_pages(registry: ClientRegistry) -> None:
    for index in range(7):
        kind = "iot-gateway" if index % 2 else "phone"
        registry.enroll(f"c{index}", device(device_class=kind), now=NOW + timedelta(minutes=index))
    registry.set_status("c3", ClientStatus.SUSPENDED)
    ids = [record.client_id for record in registry.list()]
    assert ids == [f"c{index}" for index in range(7)]
    assert [r.client_id for r in registry.list(limit=3, offset=2)] == ["c2", "c3", "c4"]
    assert [r.client_id for r in registry.list(status=ClientStatus.SUSPENDED)] == ["c3"]
    assert [r.client_id for r in registry.list(device_class="iot-gateway")] == ["c1", "c3", "c5"]
    since = NOW + timedelta(minutes=5)
    assert [r.client_id for r in registry.list(seen_since=since)] == ["c5", "c6"]
    assert registry.list(limit=0) == []
    assert registry.count(status=ClientStatus.ACTIVE) == 6
    with pytest.raises(RegistryError):
        registry.list(limit=-1)


def test_the_census_counts_each_status_and_device_class(registry: ClientRegistry) -> None:
    assert registry.census() == {}
    for index in range(5):
        kind = "iot-gateway" if index % 2 else "phone"
        registry.enroll(f"c{index}", device(device_class=kind), now=NOW)
    registry.set_status("c3", ClientStatus.SUSPENDED)
    registry.set_status("c4", ClientStatus.RETIRED)
    assert registry.census() == {
        (ClientStatus.ACTIVE, "phone"): 2,
        (ClientStatus.RETIRED, "phone"): 1,
        (ClientStatus.ACTIVE, "iot-gateway"): 1,
        (ClientStatus.SUSPENDED, "iot-gateway"): 1,
    }


def test_a_heartbeat_batch_updates_state_and_last_seen(registry: ClientRegistry) -> None:
    for index in range(5):
        registry.enroll(f"c{index}", device(), now=NOW)
    batch = [heartbeat(f"c{index}", seconds=60, battery_level=0.1 * index) for index in range(5)]
    assert registry.record_heartbeats(batch) == 5
    for index in range(5):
        record = registry.get(f"c{index}")
        assert record.last_seen == NOW + timedelta(seconds=60)
        assert math.isclose(record.device.battery_level, 0.1 * index)
        assert not record.device.charging and not record.device.wifi
        assert record.device.app_version == "2.4.1"  # heartbeats leave versions alone


def test_heartbeats_of_unknown_clients_and_stale_heartbeats_change_nothing(
    registry: ClientRegistry,
) -> None:
    registry.enroll("c1", device(), now=NOW)
    registry.record_heartbeats([heartbeat("c1", seconds=60, battery_level=0.6)])
    stale = heartbeat("c1", seconds=30, battery_level=0.1)
    assert registry.record_heartbeats([stale, heartbeat("ghost", seconds=90)]) == 0
    record = registry.get("c1")
    assert record.device.battery_level == 0.6 and record.last_seen == NOW + timedelta(seconds=60)
    assert registry.count() == 1


def test_the_latest_heartbeat_in_a_batch_wins(registry: ClientRegistry) -> None:
    registry.enroll("c1", device(), now=NOW)
    batch = [
        heartbeat("c1", seconds=90, battery_level=0.9),
        heartbeat("c1", seconds=10, battery_level=0.1),
        heartbeat("c1", seconds=50, battery_level=0.5),
    ]
    assert registry.record_heartbeats(batch) == 1
    assert registry.get("c1").device.battery_level == 0.9


def test_concurrent_batches_sharing_clients_never_deadlock(registry: ClientRegistry) -> None:
    # each thread writes the same clients in its own order: unordered row locks
    # made PostgreSQL abort one of two such transactions with "deadlock detected"
    clients = [f"c{index}" for index in range(40)]
    for client_id in clients:
        registry.enroll(client_id, device(), now=NOW)
    errors: list[Exception] = []

    def send(seed: int) -> None:
        order = random.Random(seed)
        for step in range(20):
            picked = order.sample(clients, 30)
            try:
                registry.record_heartbeats(
                    [heartbeat(client_id, seconds=seed * 100 + step + 1) for client_id in picked]
                )
            except Exception as exc:  # collected: an exception in a thread is not a failure
                errors.append(exc)

    threads = [threading.Thread(target=send, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.parametrize(
    "bad",
    [
        {"battery_level": math.nan},
        {"battery_level": 1.5},
        {"ram_gb": -1.0},
        {"ram_gb": math.inf},
        {"device_class": ""},
        {"app_version": ""},
        {"app_version": "x" * 65},
    ],
)
def test_bad_device_states_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        device(**bad)


def test_bad_heartbeats_and_times_are_refused(registry: ClientRegistry) -> None:
    with pytest.raises(RegistryError, match="timezone-aware"):
        Heartbeat(client_id="c1", seen_at=datetime(2026, 1, 1), battery_level=0.5,
                  charging=True, wifi=True)  # fmt: skip
    with pytest.raises(RegistryError):
        heartbeat("c1", seconds=1, battery_level=-0.1)
    with pytest.raises(RegistryError):
        heartbeat("", seconds=1)
    with pytest.raises(RegistryError, match="timezone-aware"):
        registry.enroll("c1", device(), now=datetime(2026, 1, 1))
    with pytest.raises(RegistryError):
        registry.enroll("x" * 129, device(), now=NOW)


def test_a_population_enrolls_at_once_and_keeps_earlier_statuses(registry: ClientRegistry) -> None:
    assert registry.enroll_population({}) == 0
    fleet = {f"sim-{index}": device() for index in range(50)}
    assert registry.enroll_population(fleet) == 50
    registry.set_status("sim-3", ClientStatus.SUSPENDED, "banned")
    registry.set_status("sim-4", ClientStatus.RETIRED, "gone")
    assert registry.enroll_population({**fleet, "sim-new": device()}) == 1
    assert registry.count() == 51
    assert registry.get("sim-3").status is ClientStatus.SUSPENDED
    assert registry.barred() == {"sim-3", "sim-4"}


def test_idleness_and_free_ram_are_kept_and_change_with_heartbeats(
    registry: ClientRegistry,
) -> None:
    registry.enroll("phone", device(idle=True), now=NOW)
    assert registry.get("phone").device.idle is True
    registry.enroll("quiet", device(), now=NOW)
    assert registry.get("quiet").device.idle is None  # never reported: unknown, not "no"
    registry.record_heartbeats(
        [
            heartbeat("phone", seconds=5, idle=False, ram_gb=1.5),
            heartbeat("quiet", seconds=5, idle=True),
        ]
    )
    phone, quiet = registry.get("phone").device, registry.get("quiet").device
    assert (phone.idle, phone.ram_gb) == (False, 1.5)
    assert (quiet.idle, quiet.ram_gb) == (True, None)  # a heartbeat without RAM: unknown
    with pytest.raises(RegistryError, match="ram_gb"):
        heartbeat("phone", seconds=6, ram_gb=float("nan"))


def test_a_device_text_stored_before_it_had_to_be_printable_is_read_as_text(
    registry: ClientRegistry,
) -> None:
    """A registry written before device texts had to be printable may hold an escape
    sequence: its client still reads (the control characters shown as U+FFFD)."""
    from shoal.registry.schema import clients

    registry.enroll("old", device(), now=NOW)
    with registry.database.write() as connection:
        connection.execute(clients.update().values(device_class="\x1b[2Jphone", app_version="2\n4"))
    record = registry.get("old")
    assert record.device.device_class == "\ufffd[2Jphone"
    assert record.device.app_version == "2\ufffd4"
    profile = registry.profiles(["old"])["old"]
    assert (profile.device_class, profile.app_version) == ("\ufffd[2Jphone", "2\ufffd4")
    assert [listed.client_id for listed in registry.list()] == ["old"]
