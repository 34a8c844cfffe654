"""The selector on every backend: eligibility, never-chosen clients, uniformity, index use."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats  # type: ignore[import-untyped]
from sqlalchemy.engine import Connection

from shoal.config import SelectionSection
from shoal.core import ConfigError, RegistryError
from shoal.registry import (
    TRANSIENT_CRITERIA,
    ClientRegistry,
    ClientStatus,
    Component,
    Database,
    DeviceState,
    Requirement,
    SelectionCriteria,
    Selector,
    VersionMatrix,
)
from shoal.registry.schema import clients
from shoal.registry.selector import eligible_clause

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
MODEL = "mobilenet-v3"


def device(**changes: object) -> DeviceState:
    fields: dict[str, object] = {
        "device_class": "phone",
        "battery_level": 0.9,
        "charging": True,
        "wifi": True,
        "ram_gb": 4.0,
        "app_version": "2.4.1",
        "runtime_version": "1.2.0",
        "model_architecture_version": MODEL,
        "feature_extractor_version": "3.0",
    }
    fields.update(changes)
    return DeviceState(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Spec:
    """How to enroll one client of a test population."""

    device: DeviceState
    status: ClientStatus = ClientStatus.ACTIVE
    seen_minutes_ago: int = 0
    expires_in_minutes: int | None = None


def enroll(registry: ClientRegistry, client_id: str, spec: Spec) -> None:
    expires = None
    if spec.expires_in_minutes is not None:
        expires = NOW + timedelta(minutes=spec.expires_in_minutes)
    seen = NOW - timedelta(minutes=spec.seen_minutes_ago)
    registry.enroll(client_id, spec.device, now=seen, expires_at=expires)
    if spec.status is not ClientStatus.ACTIVE:
        registry.set_status(client_id, spec.status, "operator")


@pytest.fixture
def registry(database: Database) -> ClientRegistry:
    return ClientRegistry(database, seed=11)


@pytest.fixture
def selector(registry: ClientRegistry) -> Selector:
    matrix = VersionMatrix(registry.database)
    matrix.require(MODEL, Component.APP, minimum="2.4.0")
    matrix.require(MODEL, Component.RUNTIME, allowed=["1.2.0", "1.3.0"])
    matrix.require(MODEL, Component.FEATURE_EXTRACTOR, minimum="3.0")
    return Selector(registry, matrix)


SEED_QUERY = SelectionCriteria(
    model=MODEL, min_app_version="2.4", min_ram_gb=2.0, seen_within=timedelta(hours=1)
)

INELIGIBLE = [
    (Spec(device(charging=False)), "not charging"),
    (Spec(device(wifi=False)), "not on WiFi"),
    (Spec(device(ram_gb=1.5)), "1.5 GB of RAM is below the minimum 2"),
    (Spec(device(charging=None)), "charging is unknown"),
    (Spec(device(wifi=None)), "WiFi is unknown"),
    (Spec(device(ram_gb=None)), "RAM is unknown, and the minimum is 2 GB"),
    (Spec(device(app_version="2.3.9")), "app version 2.3.9 is below the minimum 2.4"),
    (Spec(device(), seen_minutes_ago=61), "last seen at 2026-03-20T08:59:00+00:00"),
    (Spec(device(), status=ClientStatus.SUSPENDED), "client is suspended: operator"),
    (Spec(device(), status=ClientStatus.RETIRED), "client is retired: operator"),
    (Spec(device(), expires_in_minutes=0), "enrollment expired at 2026-03-20T10:00:00+00:00"),
    (
        Spec(device(runtime_version="1.1.0")),
        "runtime version 1.1.0 is not one of 1.2.0, 1.3.0 for model arch mobilenet-v3",
    ),
    (
        Spec(device(feature_extractor_version=None)),
        "feature extractor version is unknown, and model arch mobilenet-v3 requires one",
    ),
]


@pytest.mark.parametrize(("spec", "reason"), INELIGIBLE)
def test_an_ineligible_client_is_never_chosen_and_told_why(
    registry: ClientRegistry, selector: Selector, spec: Spec, reason: str
) -> None:
    for index in range(12):
        enroll(registry, f"ok-{index:02d}", Spec(device(), expires_in_minutes=5))
    enroll(registry, "odd-one", spec)
    for seed in range(5):
        chosen = selector.select(SEED_QUERY, 20, rng=seed, now=NOW)
        assert sorted(chosen) == [f"ok-{index:02d}" for index in range(12)]
    # the whole eligible population (what a DP round samples from) leaves it out too
    assert selector.population(SEED_QUERY, now=NOW) == [f"ok-{index:02d}" for index in range(12)]
    verdict = selector.check(registry.get("odd-one"), SEED_QUERY, now=NOW)
    assert not verdict.can_train and verdict.reason is not None
    assert verdict.reason.startswith(reason)
    assert selector.check(registry.get("ok-00"), SEED_QUERY, now=NOW).can_train


def test_the_matrix_reason_is_the_one_from_the_seed(
    registry: ClientRegistry, selector: Selector
) -> None:
    enroll(registry, "old-app", Spec(device(app_version="2.3.0")))
    verdict = selector.check(registry.get("old-app"), SelectionCriteria(model=MODEL), now=NOW)
    assert (
        verdict.reason == "app version 2.3.0 is below the minimum 2.4.0 for model arch mobilenet-v3"
    )
    assert selector.select(SelectionCriteria(model=MODEL), 5, now=NOW) == []
    assert selector.select(SelectionCriteria(), 5, now=NOW) == ["old-app"]


def test_unknown_facts_bar_only_the_criteria_that_ask_for_them(
    registry: ClientRegistry, selector: Selector
) -> None:
    facts = {"battery_level": None, "charging": None, "wifi": None, "ram_gb": None}
    enroll(registry, "server", Spec(device(device_class="server", **facts)))
    relaxed = SelectionCriteria(model=MODEL, require_charging=False, require_wifi=False)
    assert selector.select(relaxed, 5, now=NOW) == ["server"]
    assert selector.check(registry.get("server"), relaxed, now=NOW).can_train
    for strict, reason in [
        (replace(relaxed, require_charging=True), "charging is unknown"),
        (replace(relaxed, require_wifi=True), "WiFi is unknown"),
        (replace(relaxed, min_ram_gb=0.5), "RAM is unknown, and the minimum is 0.5 GB"),
    ]:
        assert selector.select(strict, 5, now=NOW) == []
        assert selector.check(registry.get("server"), strict, now=NOW).reason == reason


def test_an_empty_registry_and_zero_counts(selector: Selector) -> None:
    assert selector.select(SEED_QUERY, 10, rng=0, now=NOW) == []
    assert selector.select(SEED_QUERY, 0, rng=0, now=NOW) == []
    with pytest.raises(RegistryError):
        selector.select(SEED_QUERY, -1, now=NOW)


def test_asking_for_more_than_are_eligible_returns_them_all(
    registry: ClientRegistry, selector: Selector
) -> None:
    for index in range(30):
        enroll(registry, f"c{index}", Spec(device(charging=index % 3 != 0)))
    chosen = selector.select(SEED_QUERY, 1000, rng=1, now=NOW)
    assert len(chosen) == len(set(chosen)) == 20
    assert all(int(client_id[1:]) % 3 != 0 for client_id in chosen)


def test_windows_that_overlap_still_fill_the_cohort(registry: ClientRegistry) -> None:
    for index in range(25):
        enroll(registry, f"c{index}", Spec(device()))
    tiny_windows = Selector(registry, window=2, oversample=1.0)
    for seed in range(10):
        chosen = tiny_windows.select(SelectionCriteria(), 24, rng=seed, now=NOW)
        assert len(set(chosen)) == 24
    # more eligible clients than a window holds, fewer than the pool: all of them
    assert len(set(Selector(registry, window=4).select(SelectionCriteria(), 30, now=NOW))) == 25
    assert len(set(Selector(registry, window=4).select(SelectionCriteria(), 20, now=NOW))) == 20


def test_the_same_seed_gives_the_same_read_only_draw(
    registry: ClientRegistry, selector: Selector
) -> None:
    for index in range(50):
        enroll(registry, f"c{index}", Spec(device()))
    draw = selector.select(SEED_QUERY, 10, rng=3, now=NOW, refresh_keys=False)
    assert selector.select(SEED_QUERY, 10, rng=3, now=NOW, refresh_keys=False) == draw
    assert selector.select(SEED_QUERY, 10, rng=4, now=NOW, refresh_keys=False) != draw


def test_chosen_clients_get_fresh_sample_keys(registry: ClientRegistry, selector: Selector) -> None:
    for index in range(40):
        enroll(registry, f"c{index}", Spec(device()))
    before = {record.client_id: record.sample_key for record in registry.list()}
    chosen = set(selector.select(SEED_QUERY, 8, rng=5, now=NOW))
    after = {record.client_id: record.sample_key for record in registry.list()}
    assert {c for c in before if before[c] != after[c]} == chosen


ELIGIBLE, COHORT, DRAWS = 60, 5, 1000


def chi_square_p_value(selector: Selector, *, refresh_keys: bool) -> float:
    """Chi-square p-value of how often each eligible client was chosen in many seeded draws.

    Windows of 16 rows, much smaller than the population, make the fixed-key
    bias (relative spread 1/sqrt(16)) large enough to see in 1,000 draws.
    """
    small_windows = Selector(selector.registry, selector.matrix, window=16, oversample=2.0)
    for index in range(ELIGIBLE):
        enroll(selector.registry, f"ok-{index:03d}", Spec(device()))
    for index, (spec, _) in enumerate(INELIGIBLE * 2):
        enroll(selector.registry, f"no-{index:03d}", spec)
    counts: Counter[str] = Counter()
    for draw in range(DRAWS):
        chosen = small_windows.select(
            SEED_QUERY, COHORT, rng=draw, now=NOW, refresh_keys=refresh_keys
        )
        assert len(set(chosen)) == COHORT and all(c.startswith("ok-") for c in chosen)
        counts.update(chosen)
    observed = [counts[f"ok-{index:03d}"] for index in range(ELIGIBLE)]
    return float(stats.chisquare(observed).pvalue)  # 83 expected picks each, 59 dof


def test_every_eligible_client_is_chosen_equally_often(selector: Selector) -> None:
    assert chi_square_p_value(selector, refresh_keys=True) > 0.01


def test_the_uniformity_check_rejects_fixed_keys(selector: Selector) -> None:
    # without fresh keys a client's odds follow the key gaps before it: the test must see it
    assert chi_square_p_value(selector, refresh_keys=False) < 1e-3


population = st.lists(
    st.builds(
        Spec,
        device=st.builds(
            device,
            battery_level=st.sampled_from([None, 0.2, 1.0]),
            charging=st.sampled_from([None, True, False]),
            wifi=st.sampled_from([None, True, False]),
            ram_gb=st.sampled_from([None, 1.0, 2.0, 4.0]),
            app_version=st.sampled_from(["2.3.0", "2.4", "2.4.1", "2.10.0", "2.4.0-beta"]),
            runtime_version=st.sampled_from(["1.1.0", "1.2.0", "1.3.0"]),
            feature_extractor_version=st.sampled_from([None, "2.9", "3.0", "3.0.1"]),
            device_class=st.sampled_from(["phone", "gateway"]),
        ),
        status=st.sampled_from(list(ClientStatus)),
        seen_minutes_ago=st.integers(0, 120),
        expires_in_minutes=st.sampled_from([None, -10, 0, 10]),
    ),
    max_size=25,
)
criteria_strategy = st.builds(
    SelectionCriteria,
    model=st.sampled_from([None, MODEL]),
    require_charging=st.booleans(),
    require_wifi=st.booleans(),
    min_app_version=st.sampled_from([None, "2.4", "2.10"]),
    min_ram_gb=st.sampled_from([0.0, 2.0, 4.0]),
    seen_within=st.sampled_from([None, timedelta(minutes=30), timedelta(hours=1)]),
    device_classes=st.sampled_from([None, frozenset({"phone"})]),
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=population, criteria=criteria_strategy, seed=st.integers(0, 2**32))
def test_the_database_and_the_explanation_agree_on_every_client(
    registry: ClientRegistry,
    selector: Selector,
    specs: list[Spec],
    criteria: SelectionCriteria,
    seed: int,
) -> None:
    with registry.database.write() as connection:
        connection.execute(clients.delete())
    for index, spec in enumerate(specs):
        enroll(registry, f"c{index:02d}", spec)
    eligible = {
        record.client_id
        for record in registry.list(limit=1000)
        if selector.check(record, criteria, now=NOW).can_train
    }
    everyone = selector.select(criteria, len(specs) + 3, rng=seed, now=NOW)
    assert sorted(everyone) == sorted(eligible)
    some = selector.select(criteria, 3, rng=seed, now=NOW)
    assert len(some) == min(3, len(eligible)) and set(some) <= eligible


@contextmanager
def explained(connection: Connection) -> Iterator[list[str]]:
    """Collect the plan of the statements run on ``connection`` instead of running them."""
    prefix = "EXPLAIN QUERY PLAN " if connection.dialect.name == "sqlite" else "EXPLAIN "
    plan: list[str] = []

    def explain(
        conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> tuple[str, Any]:
        return prefix + statement, parameters

    sa.event.listen(connection, "before_cursor_execute", explain, retval=True)
    try:
        yield plan
    finally:
        sa.event.remove(connection, "before_cursor_execute", explain)


def test_a_window_walks_an_index_in_key_order(database: Database) -> None:
    query = (
        sa.select(clients.c.client_id)
        .where(eligible_clause(SEED_QUERY, (), now=NOW), clients.c.sample_key >= 12345)
        .order_by(clients.c.sample_key)
        .limit(100)
    )
    with database.read() as connection:
        if connection.dialect.name == "postgresql":
            # an empty table is cheapest to scan: ask whether an index can do it, unsorted
            connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
            connection.exec_driver_sql("SET LOCAL enable_bitmapscan = off")
        with explained(connection):
            plan = " ".join(str(row[-1]) for row in connection.execute(query))
    assert "ix_clients_sampling" in plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_app_version": "2.4-beta"},
        {"min_ram_gb": -1.0},
        {"min_ram_gb": float("nan")},
        {"seen_within": timedelta(0)},
        {"device_classes": frozenset()},
    ],
)
def test_bad_criteria_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SelectionCriteria(**kwargs)


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"oversample": 0.5}])
def test_window_and_oversample_are_checked(
    registry: ClientRegistry, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError):
        Selector(registry, **kwargs)


POLICIES = [
    SelectionSection(require_charging=True),
    SelectionSection(require_wifi=True),
    SelectionSection(require_idle=True),
    SelectionSection(min_battery=0.5),
    SelectionSection(min_ram_gb=2.0),
    SelectionSection(min_app_version="2.4"),
    SelectionSection(device_classes=["tablet"]),
    SelectionSection(require_charging=True, require_idle=True, min_battery=0.5, min_ram_gb=2.0),
    SelectionSection(),
]
FACTS = {
    "charging": [True, False, None],
    "idle": [True, False, None],
    "battery_level": [0.8, 0.2, None],
    "ram_gb": [4.0, 1.0, None],
}


@pytest.mark.parametrize("policy", POLICIES, ids=lambda policy: "+".join(policy.criteria()))
def test_the_sql_policy_and_its_reasons_agree_and_unknown_is_never_met(
    registry: ClientRegistry, policy: SelectionSection
) -> None:
    """Every mix of known, unknown and failing facts: SQL selects exactly the clients that the
    Python check finds no reason against, and every reason is named after its criterion."""
    combinations = list(itertools.product(*FACTS.values()))
    for index, values in enumerate(combinations):
        facts = dict(zip(FACTS, values, strict=True))
        app = "2.3.0" if index % 2 else "2.5.0"
        registry.enroll(f"c{index:02d}", device(app_version=app, **facts), now=NOW)
    selector = Selector(registry)
    criteria = SelectionCriteria.from_section(policy, model=MODEL)
    selected = set(selector.population(criteria, now=NOW))
    for record in registry.list(limit=1000):
        unmet = selector.unmet(record, criteria, now=NOW)
        assert set(unmet) <= set(policy.criteria())
        assert (record.client_id in selected) == (not unmet), (record.device, unmet)
        for name, value in (("charging", record.device.charging), ("idle", record.device.idle)):
            if name in policy.criteria() and value is None:
                assert unmet[name] == f"{'idleness' if name == 'idle' else name} is unknown"
        if "battery" in policy.criteria() and record.device.battery_level is None:
            assert unmet["battery"] == "the battery level is unknown, and the minimum is 50%"
    if not policy.criteria():
        assert len(selected) == len(combinations)  # no policy: every client
    assert len(selected) > 0 or "device_class" in policy.criteria()


def test_the_policy_names_what_each_criterion_excludes(registry: ClientRegistry) -> None:
    policy = SelectionSection(
        require_charging=True, require_wifi=True, require_idle=True, min_battery=0.3,
        min_ram_gb=2.0, min_app_version="2.4", device_classes=["phone"],
    )  # fmt: skip
    tired = device(charging=False, wifi=None, idle=False, battery_level=0.1, ram_gb=1.0)
    registry.enroll("tired", replace(tired, app_version="2.3", device_class="watch"), now=NOW)
    matrix = VersionMatrix(registry.database)
    matrix.require(MODEL, Component.RUNTIME, minimum="9.0")
    required = Requirement(Component.APP, minimum="3.0")
    criteria = SelectionCriteria.from_section(policy, model=MODEL, requirements=(required,))
    unmet = Selector(registry, matrix).unmet(registry.get("tired"), criteria, now=NOW)
    assert unmet == {
        "charging": "not charging",
        "wifi": "WiFi is unknown",
        "idle": "not idle",
        "battery": "the battery at 10% is below the minimum 30%",
        "ram": "1 GB of RAM is below the minimum 2",
        "app_version": "app version 2.3 is below the minimum 2.4",
        "device_class": "device class watch is not selected",
        "versions": "runtime version 1.2.0 is below the minimum 9.0 for model arch mobilenet-v3; "
        "app version 2.3 is below the minimum 3.0 for model arch mobilenet-v3",
    }
    assert set(unmet) - {"versions"} == set(policy.criteria())
    assert set(unmet) - TRANSIENT_CRITERIA == {"app_version", "device_class", "versions"}


def test_an_empty_policy_takes_every_active_client(registry: ClientRegistry) -> None:
    criteria = SelectionCriteria.from_section(SelectionSection(), model=None)
    assert (criteria.require_charging, criteria.require_wifi, criteria.min_battery) == (
        False,
        False,
        0.0,
    )
    registry.enroll("server", DeviceState(), now=NOW)
    assert Selector(registry).select(criteria, 3, now=NOW) == ["server"]


@pytest.mark.parametrize("battery", [-0.1, 1.5, float("nan")])
def test_a_battery_minimum_outside_zero_to_one_is_refused(battery: float) -> None:
    with pytest.raises(ConfigError, match="min_battery"):
        SelectionCriteria(min_battery=battery)
