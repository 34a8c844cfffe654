"""Device profiles: arrivals in virtual time, dropouts, stragglers and partial work."""

from __future__ import annotations

import pytest

from shoal.config import DeviceClass, DevicesSection
from shoal.simulation import devices as devices_module
from shoal.simulation.devices import DeviceFleet

IDS = [f"client-{index:05d}" for index in range(200)]


def fleet(**settings: object) -> DeviceFleet:
    classes = settings.pop(
        "classes", [DeviceClass(name="phone", share=1.0, examples_per_second=10)]
    )
    return DeviceFleet(IDS, DevicesSection(classes=classes, **settings), seed=0)  # type: ignore[arg-type]


def plan(
    devices: DeviceFleet, client: str = IDS[0], *, examples: int = 100, round_number: int = 1
) -> object:
    return devices.plan_fit(
        client,
        round_number=round_number,
        start=10.0,
        deadline_at=110.0,
        num_examples=examples,
        epochs=1.0,
        model_bytes=4000,
    )


def test_arrival_time_follows_work_and_bandwidth() -> None:
    devices = fleet(speed_jitter=0.0)
    fast = plan(devices, examples=10)
    slow = plan(devices, examples=500)
    assert fast.arrives_at is not None and slow.arrives_at is not None  # type: ignore[attr-defined]
    assert 10.0 < fast.arrives_at < slow.arrives_at  # type: ignore[attr-defined]


def test_behaviour_is_reproducible_per_round_and_client() -> None:
    assert plan(fleet()) == plan(fleet())
    assert plan(fleet(), round_number=1) != plan(fleet(), round_number=2)


def test_dropout_rate_and_availability_match_the_profile() -> None:
    flaky = DeviceClass(name="flaky", share=1.0, dropout=0.3, availability=0.6)
    devices = fleet(classes=[flaky])
    drops = [plan(devices, client).dropped for client in IDS]  # type: ignore[attr-defined]
    assert 0.2 < sum(drops) / len(drops) < 0.4
    online = [len(devices.available(round_number)) / len(IDS) for round_number in range(20)]
    assert 0.5 < sum(online) / len(online) < 0.7


def test_device_classes_follow_their_shares() -> None:
    classes = [DeviceClass(name="a", share=3.0), DeviceClass(name="b", share=1.0)]
    devices = fleet(classes=classes)
    share_a = sum(devices.device_class(client).name == "a" for client in IDS) / len(IDS)
    assert 0.65 < share_a < 0.85


def test_classes_of_names_each_clients_own_class_in_order() -> None:
    classes = [DeviceClass(name="a", share=1.0), DeviceClass(name="b", share=1.0)]
    devices = fleet(classes=classes)
    asked = [IDS[7], IDS[3], IDS[7], IDS[150]]
    assert devices.classes_of(asked) == [devices.device_class(c).name for c in asked]
    assert {*devices.classes_of(IDS)} == {"a", "b"}
    assert devices.classes_of([]) == []


@pytest.mark.parametrize(("policy", "partial"), [("drop", False), ("partial", True)])
def test_paper_stragglers_miss_the_deadline_or_send_partial_work(
    policy: str, partial: bool
) -> None:
    devices = fleet(straggler_fraction=1.0, straggler_policy=policy)
    attempt = plan(devices)
    assert attempt.straggler  # type: ignore[attr-defined]
    if partial:
        assert attempt.arrives_at <= 110.0 and 0 < attempt.epochs < 1.0  # type: ignore[attr-defined]
    else:
        assert attempt.arrives_at > 110.0 and attempt.epochs == 1.0  # type: ignore[attr-defined]


def test_slow_devices_straggle_past_the_deadline_unless_partial_work_is_allowed() -> None:
    snail = [DeviceClass(name="snail", share=1.0, examples_per_second=1.0)]
    dropped = plan(fleet(classes=snail, speed_jitter=0.0, straggler_policy="drop"), examples=500)
    partial = plan(fleet(classes=snail, speed_jitter=0.0, straggler_policy="partial"), examples=500)
    assert dropped.arrives_at > 110.0  # type: ignore[attr-defined]
    assert partial.arrives_at <= 110.0 and partial.epochs < 1.0  # type: ignore[attr-defined]


def test_an_attempt_with_nothing_to_draw_makes_no_generator_and_plans_as_one_that_draws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quiet = fleet(speed_jitter=0.0)  # no dropout, no paper stragglers, no jitter
    drawing = fleet(  # a dropout no draw in a thousand rounds meets: the generator is made
        speed_jitter=0.0,
        classes=[DeviceClass(name="phone", share=1.0, examples_per_second=10, dropout=1e-300)],
    )
    expected = [plan(drawing, client, round_number=r) for client in IDS[:20] for r in (1, 2)]
    made: list[object] = []
    original = devices_module.round_rng
    monkeypatch.setattr(devices_module, "round_rng", lambda **kw: made.append(kw) or original(**kw))
    assert [plan(quiet, client, round_number=r) for client in IDS[:20] for r in (1, 2)] == expected
    assert made == []  # nothing random about these attempts
    assert plan(drawing) == expected[0] and len(made) == 1
