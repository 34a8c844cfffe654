"""Version ordering and the versioning matrix: stored requirements, and the reasons told."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core import ConfigError
from shoal.registry import (
    Component,
    Database,
    DeviceState,
    Eligibility,
    Requirement,
    VersionMatrix,
    version_key,
)

MODEL = "mobilenet-v3"

numeric_versions = st.lists(st.integers(0, 10**6), min_size=1, max_size=5)


def dotted(numbers: list[int]) -> str:
    return ".".join(str(number) for number in numbers)


def padded(numbers: list[int]) -> tuple[int, ...]:
    return tuple(numbers) + (0,) * (5 - len(numbers))


@given(numeric_versions, numeric_versions)
def test_version_keys_order_like_versions(left: list[int], right: list[int]) -> None:
    left_key, right_key = version_key(dotted(left)), version_key(dotted(right))
    assert left_key is not None and right_key is not None
    assert (left_key < right_key) == (padded(left) < padded(right))
    assert (left_key == right_key) == (padded(left) == padded(right))


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [("2.4.1", "2.10.0"), ("2.4", "2.4.1"), ("1.9.9", "2"), ("0", "0.0.1"), ("v2.4", "2.5")],
)
def test_version_key_examples(smaller: str, larger: str) -> None:
    assert version_key(smaller) < version_key(larger)  # type: ignore[operator]


@pytest.mark.parametrize("text", ["", "2.4.0-beta", "2..4", "abc", "2.4.x", " 2.4", "1" * 11])
def test_non_numeric_versions_have_no_key(text: str) -> None:
    assert version_key(text) is None


def versions(**changes: str | None) -> DeviceState:
    fields: dict[str, object] = {
        "device_class": "phone",
        "battery_level": 1.0,
        "charging": True,
        "wifi": True,
        "ram_gb": 4.0,
        "app_version": "2.4.1",
        "runtime_version": "1.2.0",
        "model_architecture_version": MODEL,
        "feature_extractor_version": "3.1",
    }
    fields.update(changes)
    return DeviceState(**fields)  # type: ignore[arg-type]


def test_the_reason_an_old_app_is_told() -> None:
    requirement = Requirement(Component.APP, minimum="2.4.0")
    assert requirement.check("2.3.0", model=MODEL) == (
        "app version 2.3.0 is below the minimum 2.4.0 for model arch mobilenet-v3"
    )
    assert requirement.check("2.4", model=MODEL) is None
    assert requirement.check("2.10.0", model=MODEL) is None


def test_the_reasons_for_sets_unknown_and_incomparable_versions() -> None:
    allowed = Requirement(Component.MODEL_ARCHITECTURE, allowed=frozenset({MODEL, "mobilenet-v4"}))
    assert allowed.check("mobilenet-v2", model=MODEL) == (
        "model architecture version mobilenet-v2 is not one of mobilenet-v3, mobilenet-v4 "
        "for model arch mobilenet-v3"
    )
    minimum = Requirement(Component.FEATURE_EXTRACTOR, minimum="3.0")
    assert minimum.check(None, model=MODEL) == (
        "feature extractor version is unknown, and model arch mobilenet-v3 requires one"
    )
    assert minimum.check("3.0-rc1", model=MODEL) == (
        "feature extractor version '3.0-rc1' is not comparable to the minimum 3.0 "
        "for model arch mobilenet-v3"
    )


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"minimum": "2.4-beta"}, {"allowed": frozenset()}],
)
def test_malformed_requirements_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Requirement(Component.APP, **kwargs)  # type: ignore[arg-type]


def test_eligibility_needs_a_reason_exactly_when_rejected() -> None:
    assert Eligibility.rejected([]) == Eligibility(True)
    assert Eligibility.rejected(["a", "b"]) == Eligibility(False, "a; b")
    with pytest.raises(ConfigError):
        Eligibility(False)
    with pytest.raises(ConfigError):
        Eligibility(True, "why")


def test_an_empty_matrix_accepts_everyone(database: Database) -> None:
    matrix = VersionMatrix(database)
    assert matrix.models() == []
    assert matrix.requirements(MODEL) == ()
    assert matrix.check(versions(app_version="0.0.1"), model=MODEL) == Eligibility(True)


def test_requirements_are_stored_replaced_and_removed(database: Database) -> None:
    matrix = VersionMatrix(database)
    matrix.require(MODEL, Component.RUNTIME, allowed=["1.2.0", "1.3.0"])
    matrix.require(MODEL, Component.APP, minimum="2.0")
    matrix.require(MODEL, Component.APP, minimum="2.4.0")  # replaces the first
    matrix.require("other-model", Component.APP, minimum="9")
    assert matrix.requirements(MODEL) == (
        Requirement(Component.APP, minimum="2.4.0"),
        Requirement(Component.RUNTIME, allowed=frozenset({"1.2.0", "1.3.0"})),
    )
    assert VersionMatrix(database).models() == [MODEL, "other-model"]
    assert matrix.remove(MODEL, Component.RUNTIME) == 1
    assert matrix.requirements(MODEL) == (Requirement(Component.APP, minimum="2.4.0"),)
    assert matrix.remove("other-model") == 1 and matrix.remove("other-model") == 0
    with pytest.raises(ConfigError):
        matrix.require("", Component.APP, minimum="1")


def test_check_tells_every_unmet_requirement(database: Database) -> None:
    matrix = VersionMatrix(database)
    matrix.require(MODEL, Component.APP, minimum="2.4.0")
    matrix.require(MODEL, Component.RUNTIME, minimum="1.0", allowed=["1.2.0"])
    matrix.require(MODEL, Component.FEATURE_EXTRACTOR, minimum="3.0")
    assert matrix.check(versions(), model=MODEL) == Eligibility(True)
    verdict = matrix.check(versions(app_version="2.3.0", runtime_version="1.1"), model=MODEL)
    assert verdict == Eligibility(
        False,
        "app version 2.3.0 is below the minimum 2.4.0 for model arch mobilenet-v3; "
        "runtime version 1.1 is not one of 1.2.0 for model arch mobilenet-v3",
    )
    assert not matrix.check(versions(feature_extractor_version="2.9"), model=MODEL).can_train
    assert matrix.check(versions(app_version="2.3.0"), model="other").can_train
