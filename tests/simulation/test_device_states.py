"""Simulated device states: time zones, the diurnal cycle, the battery, versions, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.config import DeviceClass, DevicesSection, DeviceStates, parse_config
from shoal.core.errors import ConfigError
from shoal.registry.versioning import Component
from shoal.simulation.device_states import Draw, hashed_uniform
from shoal.simulation.devices import DeviceFleet
from shoal.simulation.population import ClientNames, client_index

COUNT = 4000
ALL = np.arange(COUNT, dtype=np.int64)
HOUR = 3600.0


def phones(**devices: object) -> DevicesSection:
    phone = DeviceClass(
        name="phone",
        share=1.0,
        ram_gb=3,
        app_versions={"2.5.0": 0.7, "2.3.1": 0.3},
        states=DeviceStates(),
    )
    return DevicesSection(classes=[phone], **devices)  # type: ignore[arg-type]


def fleet(settings: DevicesSection | None = None, *, seed: int = 0) -> DeviceFleet:
    return DeviceFleet(ClientNames(COUNT), settings or phones(), seed=seed, position=client_index)


def share(mask: np.ndarray) -> float:
    return float(np.mean(mask))


def test_phones_charge_and_idle_at_night_in_their_own_time_zone() -> None:
    utc = fleet(phones())
    night, afternoon = utc.facts(ALL, at=3 * HOUR), utc.facts(ALL, at=14 * HOUR)
    assert share(night.charging == 1.0) > 0.75 and share(afternoon.charging == 1.0) < 0.1
    assert share(night.idle == 1.0) > 0.85 and share(afternoon.idle == 1.0) < 0.25
    assert share(night.wifi == 1.0) > share(afternoon.wifi == 1.0)
    # eight hours east, 03:00 UTC is 11:00 local: the same phones are up and about
    east = fleet(phones(time_zones={"+8": 1.0}))
    assert share(east.facts(ALL, at=3 * HOUR).charging == 1.0) < 0.1
    assert share(east.facts(ALL, at=19 * HOUR).charging == 1.0) > 0.75  # 03:00 local


def test_time_zones_follow_their_shares_and_set_the_local_hour() -> None:
    devices = fleet(phones(time_zones={"-5": 0.25, "+5.5": 0.75}, start_utc_hour=6))
    offsets = devices.states.utc_offsets(ALL)
    assert set(np.unique(offsets).tolist()) == {-5.0, 5.5}
    assert 0.7 < share(offsets == 5.5) < 0.8
    hours = devices.states.local_hours(ALL, at=2 * HOUR)
    assert set(np.unique(hours).tolist()) == {3.0, 13.5}


def test_versions_and_ram_follow_the_class() -> None:
    facts = fleet().facts(ALL, at=0.0)
    apps = facts.versions[Component.APP]
    assert set(apps.tolist()) == {"2.5.0", "2.3.1"}
    assert 0.25 < share(apps == "2.3.1") < 0.35
    assert set(facts.versions[Component.RUNTIME].tolist()) == {"1.0.0"}  # DeviceState's default
    assert np.all(facts.ram_gb == 3)


def test_a_class_without_states_reports_nothing_it_does_not_know() -> None:
    plain = DevicesSection(classes=[DeviceClass(name="server", share=1.0)])
    facts = fleet(plain).facts(ALL[:10], at=5 * HOUR)
    for column in (facts.charging, facts.wifi, facts.idle, facts.battery_level, facts.ram_gb):
        assert np.all(np.isnan(column))
    assert set(facts.versions[Component.APP].tolist()) == {"1.0.0"}


def test_states_are_a_function_of_seed_device_and_time_alone() -> None:
    one, other = fleet(), fleet()
    picked = np.array([3999, 7, 1200, 7], dtype=np.int64)
    for at in (0.0, 5 * HOUR, 30 * HOUR):
        a, b = one.facts(picked, at=at), other.facts(ALL, at=at)
        for name in ("charging", "wifi", "idle", "battery_level"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name)[picked])
    seeded = fleet(seed=1).facts(ALL, at=3 * HOUR)
    assert not np.array_equal(seeded.battery_level, one.facts(ALL, at=3 * HOUR).battery_level)


def test_the_battery_drains_by_day_and_by_training_and_a_night_on_the_charger_refills_it() -> None:
    devices = fleet(phones())
    morning, evening = devices.facts(ALL, at=9 * HOUR), devices.facts(ALL, at=20 * HOUR)
    assert np.mean(evening.battery_level) < np.mean(morning.battery_level)
    client = "client-00042"
    before = devices.facts(np.array([42]), at=12 * HOUR).battery_level[0]
    drained = devices.drain(client, at=12 * HOUR, busy_s=2 * HOUR)
    assert drained == pytest.approx(0.6)
    after = devices.facts(np.array([42]), at=12 * HOUR + 1).battery_level[0]
    assert after == pytest.approx(max(0.0, before - 0.6), abs=1e-3)
    # the next day's morning after a night on the charger: full again
    nights = fleet().states  # the same draws, without the drain
    plugged = nights.facts(np.array([42]), at=33 * HOUR).battery_level[0]
    assert devices.facts(np.array([42]), at=33 * HOUR).battery_level[0] == plugged


def test_training_drains_only_a_device_that_models_a_battery() -> None:
    plain = fleet(DevicesSection(classes=[DeviceClass(name="server", share=1.0)]))
    assert plain.drain("client-00001", at=0.0, busy_s=HOUR) == 0.0


def test_online_draws_follow_availability_for_any_sample() -> None:
    flaky = DevicesSection(classes=[DeviceClass(name="flaky", share=1.0, availability=0.6)])
    devices = fleet(flaky)
    assert 0.55 < share(devices.online(3, ALL)) < 0.65
    np.testing.assert_array_equal(devices.online(3, ALL[10:20]), devices.online(3, ALL)[10:20])


def test_hashed_draws_are_uniform_and_keyed() -> None:
    draws = hashed_uniform(seed=0, draw=Draw.WIFI, indices=ALL)
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert abs(float(draws.mean()) - 0.5) < 0.02
    assert not np.array_equal(draws, hashed_uniform(seed=0, draw=Draw.IDLE, indices=ALL))
    assert not np.array_equal(draws, hashed_uniform(seed=0, draw=Draw.WIFI, indices=ALL, slot=1))


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ({"time_zones": {"+15": 1.0}}, "UTC offset"),
        ({"time_zones": {"east": 1.0}}, "UTC offset"),
        ({"time_zones": {"0": 0.5}}, "sum to 1"),
        ({"time_zones": {}}, "at least one"),
        (
            {"classes": [{"name": "p", "share": 1, "app_versions": {"2.5": 0.9}}]},
            "sum to 1",
        ),
        (
            {"classes": [{"name": "p", "share": 1, "app_versions": {"latest": 1.0}}]},
            "app_versions",
        ),
        (
            {"classes": [{"name": "p", "share": 1, "states": {"charging_hours": [7, 7]}}]},
            "different hours",
        ),
        ({"classes": [{"name": "p", "share": 1, "states": {"wifi_by_day": 2}}]}, "wifi_by_day"),
    ],
)
def test_bad_device_settings_are_refused_with_the_key(devices: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"devices": devices})
