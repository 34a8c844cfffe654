"""The run's policy: the facts of each update come from the run's registry, and every decision
is logged: a plaintext round's with the round's records, a sealed update's at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.config import parse_config
from shoal.coordinator.events import Authentication
from shoal.coordinator.policy import RunPolicy, Submission, relative_norms
from shoal.core.device import DeviceState
from shoal.governance import PolicyEngine
from shoal.governance.pseudonyms import Pseudonyms
from shoal.registry import (
    ClientRegistry,
    ClientStatus,
    Database,
    PolicyDecisionLog,
    registry_location,
)

VERIFIED = Authentication.VERIFIED


@pytest.fixture
def database(tmp_path: Path) -> Database:
    database = registry_location(tmp_path, None).open()
    clients = ClientRegistry(database)
    clients.enroll("phone-1", DeviceState(device_class="phone", app_version="2.1.0"))
    clients.enroll("phone-2", DeviceState(device_class="phone", app_version="1.9.0"))
    clients.enroll("tablet-1", DeviceState(device_class="tablet", app_version="2.0.0"))
    clients.set_status("tablet-1", ClientStatus.SUSPENDED, "caught cheating")
    return database


def run_policy(database: Database) -> RunPolicy:
    config = parse_config(
        {"versions": {"require": [{"component": "app", "minimum": "2.0.0", "from_round": 2}]}}
    )
    return RunPolicy(
        PolicyEngine(),
        database=database,
        run_id="run-1",
        architecture="digits-softmax",
        versions=config.versions,
    )


def submitted(client: str, norm: float = 1.0) -> Submission:
    return Submission(client, VERIFIED, l2_norm=norm, relative_l2_norm=1.0, num_examples=10)


def test_the_facts_come_from_the_registry_and_the_round(database: Database) -> None:
    policy = run_policy(database)
    ids = ["phone-1", "phone-2", "tablet-1", "ghost"]
    first = policy.decide(1, [submitted(client) for client in ids])
    assert [[r.code for r in d.reasons] for d in first] == [
        [],
        [],  # its app is too old only from round 2
        ["client_not_active"],
        ["client_not_active"],  # not enrolled at all
    ]
    assert first[2].reasons[0].detail == "client tablet-1 is suspended"
    assert first[3].facts.status == "unknown" and first[3].facts.device_class is None
    assert (first[0].facts.device_class, first[0].facts.app_version) == ("phone", "2.1.0")
    second = policy.decide(2, [submitted("phone-1"), submitted("phone-2")])
    assert [[r.code for r in d.reasons] for d in second] == [[], ["versions_incompatible"]]
    assert "app version 1.9.0 is below the minimum 2.0.0" in second[1].reasons[0].detail


def test_every_decision_is_logged_with_its_facts(database: Database) -> None:
    policy = run_policy(database)
    policy.decide(1, [submitted("phone-1"), submitted("tablet-1", norm=1e9)])
    policy.decide(1, [])
    assert PolicyDecisionLog(database).decisions("run-1") == []  # held for the round's records
    policy.write(policy.take_held())
    assert policy.take_held() == []
    logged = PolicyDecisionLog(database).decisions("run-1")
    assert [(d.client_id, d.allowed) for d in logged] == [("phone-1", True), ("tablet-1", False)]
    assert [code for code, _ in logged[1].reasons] == ["client_not_active", "l2_norm_above_bound"]
    assert logged[1].facts["l2_norm"] == 1e9 and logged[1].facts["signature"] == "verified"


def test_the_log_entries_made_beside_the_query_are_the_ones_made_after_it(
    tmp_path: Path, database: Database
) -> None:
    # with work of the caller's beside the query, each decision's log entry (the client's
    # pseudonym, its facts encoded) is made there too: the same log as without it
    batch = [submitted("phone-1"), submitted("tablet-1", norm=1e9), submitted("ghost")]
    logs = []
    for run_id, beside in (("after", None), ("beside", lambda: None)):
        policy = run_policy(database)
        policy.names = Pseudonyms(b"k" * 32, run_id="run-1")
        policy.run_id = run_id
        policy.decide(3, batch, meanwhile=beside)
        policy.write(policy.take_held())
        logs.append(PolicyDecisionLog(database).decisions(policy.run_id))
    after, made_beside = logs
    assert [(d.client_id, d.allowed, d.reasons, d.facts) for d in made_beside] == [
        (d.client_id, d.allowed, d.reasons, d.facts) for d in after
    ]
    assert made_beside[0].client_id.startswith("p-") and made_beside[0].facts["l2_norm"] == 1.0

    def broken() -> None:
        raise RuntimeError("the engine's own bug")

    policy = run_policy(database)
    with pytest.raises(RuntimeError, match="own bug"):  # raised after the query, nothing logged
        policy.decide(3, batch, meanwhile=broken)
    assert policy.take_held() == []
    assert len(PolicyDecisionLog(database).decisions("run-1")) == 0


def test_a_sealed_update_is_decided_on_its_protocol_bounds(database: Database) -> None:
    policy = run_policy(database)
    sealed = Submission(
        "phone-1", VERIFIED, sealed=True, l2_norm_bound=102.0, num_examples_bound=1000
    )
    [decision] = policy.decide(1, [sealed])
    assert decision.allowed and decision.facts.l2_norm is None
    assert (decision.facts.l2_norm_bound, decision.facts.num_examples_bound) == (102.0, 1000)


def test_a_sealed_decision_is_written_at_once_with_anything_held(database: Database) -> None:
    # a sealed update is decided mid-round, when its client's first message arrives: its
    # decision cannot wait for the round's records
    policy = run_policy(database)
    policy.decide(1, [submitted("phone-2")])
    sealed = Submission("tablet-1", VERIFIED, sealed=True, l2_norm_bound=1.0)
    policy.decide(2, [sealed])
    assert policy.take_held() == []
    logged = PolicyDecisionLog(database).decisions("run-1")
    assert [(d.round, d.client_id, d.allowed) for d in logged] == [
        (1, "phone-2", True),
        (2, "tablet-1", False),
    ]


def test_held_decisions_are_written_inside_the_callers_transaction(database: Database) -> None:
    # a transaction that rolls back takes them with it: they were its round's
    policy = run_policy(database)
    policy.decide(1, [submitted("phone-1")])

    def commit_that_fails() -> None:
        with database.write():
            policy.write(policy.take_held())
            raise RuntimeError("the commit failed")

    with pytest.raises(RuntimeError, match="the commit failed"):
        commit_that_fails()
    assert PolicyDecisionLog(database).decisions("run-1") == []
    assert policy.take_held() == []
    policy.decide(2, [submitted("phone-2")])
    policy.decide(3, [submitted("tablet-1")])
    with database.write():
        policy.write(policy.take_held())
    logged = PolicyDecisionLog(database).decisions("run-1")
    assert [(d.round, d.client_id) for d in logged] == [(2, "phone-2"), (3, "tablet-1")]


@pytest.mark.parametrize(
    ("norms", "expected"),
    [
        ([], []),
        ([2.0], [1.0]),
        ([1.0, 3.0], [0.5, 1.5]),
        ([1.0, 2.0, 40.0], [0.5, 1.0, 20.0]),
        ([0.0, 0.0, 5.0], [None, None, None]),  # a zero median relates nothing
    ],
)
def test_relative_norms_are_over_the_median(
    norms: list[float], expected: list[float | None]
) -> None:
    assert relative_norms(norms) == expected
