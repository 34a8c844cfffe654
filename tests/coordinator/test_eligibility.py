"""The eligibility rule both shells share: criteria, unknown facts, counts, versions by round."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.config import SelectionSection, VersionRequirementEntry, VersionsSection
from shoal.coordinator.eligibility import VERSIONS, DeviceFacts, EligibilityPolicy
from shoal.core.device import DeviceState
from shoal.registry.clients import ClientRecord
from shoal.registry.schema import ClientStatus
from shoal.registry.selector import SelectionCriteria, unmet_criteria
from shoal.registry.versioning import Eligibility

EVERY_CRITERION = SelectionSection(
    require_charging=True,
    require_wifi=True,
    require_idle=True,
    min_battery=0.5,
    min_ram_gb=2,
    min_app_version="2.4",
    device_classes=["phone"],
)
GOOD = DeviceState(
    device_class="phone",
    battery_level=0.8,
    charging=True,
    wifi=True,
    idle=True,
    ram_gb=4,
    app_version="2.10.0",
)


def screen(
    states: list[DeviceState],
    selection: SelectionSection = EVERY_CRITERION,
    versions: VersionsSection | None = None,
    round_number: int = 1,
) -> tuple[list[bool], dict[str, int]]:
    policy = EligibilityPolicy(selection, versions or VersionsSection())
    screening = policy.screen(DeviceFacts.of(states), round_number=round_number)
    return screening.eligible.tolist(), screening.excluded


def test_a_device_meeting_every_criterion_is_eligible() -> None:
    eligible, excluded = screen([GOOD])
    assert eligible == [True]
    assert excluded == dict.fromkeys(EVERY_CRITERION.criteria(), 0)


def test_each_criterion_excludes_the_device_that_fails_it_alone() -> None:
    failing = {
        "charging": DeviceState(**{**_fields(GOOD), "charging": False}),
        "wifi": DeviceState(**{**_fields(GOOD), "wifi": False}),
        "idle": DeviceState(**{**_fields(GOOD), "idle": False}),
        "battery": DeviceState(**{**_fields(GOOD), "battery_level": 0.49}),
        "ram": DeviceState(**{**_fields(GOOD), "ram_gb": 1.5}),
        "app_version": DeviceState(**{**_fields(GOOD), "app_version": "2.3.9"}),
        "device_class": DeviceState(**{**_fields(GOOD), "device_class": "tablet"}),
    }
    for criterion, device in failing.items():
        eligible, excluded = screen([device])
        assert eligible == [False], criterion
        assert {name for name, count in excluded.items() if count} == {criterion}


def test_an_unknown_fact_never_meets_a_criterion_on_it() -> None:
    unknown = DeviceState(device_class="phone", app_version="2.5")  # no power, network, RAM
    eligible, excluded = screen([unknown])
    assert eligible == [False]
    assert excluded == {
        "charging": 1,
        "wifi": 1,
        "idle": 1,
        "battery": 1,
        "ram": 1,
        "app_version": 0,
        "device_class": 0,
    }
    # a policy that asks nothing of those facts still takes the device
    assert screen([unknown], SelectionSection()) == ([True], {})


def test_a_device_failing_two_criteria_counts_under_each() -> None:
    tired = DeviceState(**{**_fields(GOOD), "charging": False, "battery_level": 0.1})
    eligible, excluded = screen([GOOD, tired, tired])
    assert eligible == [True, False, False]
    assert excluded["charging"] == 2 and excluded["battery"] == 2
    assert sum(excluded.values()) == 4


def test_no_devices_and_no_criteria() -> None:
    assert screen([]) == ([], dict.fromkeys(EVERY_CRITERION.criteria(), 0))
    policy = EligibilityPolicy(SelectionSection(), VersionsSection())
    assert not policy.active
    assert policy.criteria(1) == ()


def test_a_version_requirement_applies_from_its_round_on() -> None:
    versions = VersionsSection(
        require=[VersionRequirementEntry(component="app", minimum="2.5", from_round=3)]
    )
    old, new = DeviceState(app_version="2.4.9"), DeviceState(app_version="2.5.0")
    before = screen([old, new], SelectionSection(), versions, round_number=2)
    assert before == ([True, True], {})
    after = screen([old, new], SelectionSection(), versions, round_number=3)
    assert after == ([False, True], {VERSIONS: 1})


def test_allowed_versions_and_other_components() -> None:
    versions = VersionsSection(
        require=[
            VersionRequirementEntry(component="runtime", allowed=["1.2.0", "1.3.0"]),
            VersionRequirementEntry(component="feature_extractor", minimum="3"),
        ]
    )
    devices = [
        DeviceState(runtime_version="1.2.0", feature_extractor_version="3.1"),
        DeviceState(runtime_version="1.2.1", feature_extractor_version="3.1"),
        DeviceState(runtime_version="1.3.0"),  # no feature extractor: unknown, refused
        DeviceState(runtime_version="1.3.0", feature_extractor_version="3.0-beta"),
    ]
    assert screen(devices, SelectionSection(), versions) == (
        [True, False, False, False],
        {VERSIONS: 3},
    )


states = st.builds(
    DeviceState,
    device_class=st.sampled_from(["phone", "tablet"]),
    battery_level=st.none() | st.floats(0, 1),
    charging=st.none() | st.booleans(),
    wifi=st.none() | st.booleans(),
    idle=st.none() | st.booleans(),
    ram_gb=st.none() | st.floats(0, 16),
    app_version=st.sampled_from(["2.3.1", "2.4", "2.4.0", "2.10", "v3", "2.5-rc1"]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(states, max_size=30))
def test_the_vectorized_rule_matches_a_device_by_device_reading(
    devices: list[DeviceState],
) -> None:
    eligible, excluded = screen(devices)
    expected = [_reference(device) for device in devices]
    assert eligible == [not failed for failed in expected]
    for criterion in EVERY_CRITERION.criteria():
        assert excluded[criterion] == sum(criterion in failed for failed in expected)


def _reference(device: DeviceState) -> set[str]:
    """The policy read one device at a time by the registry's rule, as the live coordinator
    reads a check-in (:func:`~shoal.registry.selector.unmet_criteria`): the two may not drift."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    record = ClientRecord(
        client_id="phone-1",
        device=device,
        status=ClientStatus.ACTIVE,
        status_reason=None,
        eligibility=Eligibility.allowed(),
        public_key=None,
        sample_key=0,
        enrolled_at=now,
        last_seen=now,
        expires_at=None,
    )
    criteria = SelectionCriteria.from_section(EVERY_CRITERION, model=None)
    return set(unmet_criteria(record, criteria, (), now=now))


def _fields(device: DeviceState) -> dict[str, object]:
    return {name: getattr(device, name) for name in device.__slots__}


def test_facts_of_reported_states_keep_unknown_as_nan() -> None:
    facts = DeviceFacts.of([DeviceState(charging=False, battery_level=0.3), DeviceState()])
    assert facts.charging[0] == 0.0 and np.isnan(facts.charging[1])
    assert facts.battery_level[0] == 0.3 and np.isnan(facts.battery_level[1])
    assert len(facts) == 2
