"""The update policy in simulation: a user's app that attacks, a job's own policy, a restart.

The attackers are clients of a user's own app (the public ``ClientApp``
API): one answers every round with an update of 1e30 everywhere, one claims
``2**63 - 1`` examples for an honest update. With the default policy (on by
default) both are denied with their reasons, and the model learns; with
``policy.enabled = false`` the same run is ruined, which is what the policy
stands between.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shoal
from shoal.client.api import Client, EvaluateResult, FitConfig, FitResult
from shoal.client.app import ClientContext
from shoal.core import ConfigError, all_finite
from shoal.core.parameters import Parameters
from shoal.governance.pseudonyms import Pseudonyms
from shoal.registry import DecisionRecord, PolicyDecisionLog, registry_location
from shoal.simulation.api import job_config
from shoal.simulation.runner import Simulation

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy" / "job.toml"
SIZE = 8


class Mover(Client):
    """An honest client: moves each weight half-way to 1; or, as an attacker, something else."""

    def __init__(self, attack: str | None) -> None:
        self.attack = attack

    def get_parameters(self) -> Parameters:
        return Parameters.from_arrays([np.zeros(SIZE, np.float32)])

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        moved = parameters.vector + 0.5 * (1.0 - parameters.vector)
        if self.attack == "huge":
            return FitResult([np.full(SIZE, 1e30, np.float32)], 10, is_update=True)
        examples = 2**63 - 1 if self.attack == "weight" else 10
        if self.attack == "weight":  # an honest-looking update that would outweigh the rest
            moved = parameters.vector - 1.0  # within the bounds: only its weight is out
        return FitResult([moved.astype(np.float32)], examples)

    def evaluate(self, parameters: Parameters, config: Any) -> EvaluateResult:
        return EvaluateResult(float(np.abs(parameters.vector - 1.0).mean()), 1)


def client_fn(context: ClientContext) -> Client:
    attack = {0: "huge", 1: "weight"}.get(context.partition_index or 0)
    return Mover(attack)


def attacked(tmp_path: Path, *overrides: str) -> shoal.SimulationResult:
    job = {
        "run": {"name": "attacked", "rounds": 3, "seed": 1},
        "data": {"num_clients": 6},
        "round": {"clients_per_round": 6, "over_selection": 1.0, "quorum": 0.5},
        "evaluation": {"every": 0},
        "simulation": {"workers": 0},
    }
    return shoal.simulate(job, client_app=client_fn, out=tmp_path, overrides=overrides)


def test_a_default_run_denies_huge_and_overweighted_updates_with_their_reasons(
    tmp_path: Path,
) -> None:
    result = attacked(tmp_path / "policy")
    for row in result.rows:
        assert row["committed"] and row["reported"] == 4 and row["policy_decisions"] == 6
        assert row["policy_denied"] == {
            "examples_above_cap": 1,
            "l2_norm_above_bound": 1,
            "relative_l2_norm_above_bound": 1,
        }
    np.testing.assert_allclose(result.parameters.vector, 1.0 - 0.5**3, rtol=1e-6)  # honest alone
    database = registry_location(tmp_path / "policy", None).open()
    try:
        denied = PolicyDecisionLog(database).decisions("attacked", denied_only=True)
    finally:
        database.close()
    assert len(denied) == 6  # two per round, each with its reasons and the facts it was given
    names = Pseudonyms.in_folder(tmp_path / "policy", run_id="attacked")  # the log's names

    def denied_to(client: str) -> DecisionRecord:
        return next(
            d
            for d in denied
            if names.resolve(d.client_id, round_number=d.round, candidates=[client])
        )

    huge = denied_to("client-00000")
    assert [code for code, _ in huge.reasons] == [
        "l2_norm_above_bound",
        "relative_l2_norm_above_bound",
    ]
    assert huge.facts["signature"] == "in_process"  # the simulator delivers: there is no wire
    heavy = denied_to("client-00001")
    assert heavy.reasons == (
        ("examples_above_cap", f"{2**63 - 1} examples above the cap 10000000"),
    )


def test_without_the_policy_the_same_attack_ruins_the_model(tmp_path: Path) -> None:
    result = attacked(tmp_path / "open", "policy.enabled=false")
    assert all("policy_denied" not in row for row in result.rows)
    model = result.parameters.vector
    assert not all_finite(model) or float(np.abs(model).max()) > 1e6  # from 0.875 with it


def test_a_jobs_own_policy_file_changes_decisions(tmp_path: Path) -> None:
    overrides = ["run.rounds=2"]
    own = shoal.simulate(EXAMPLE, out=tmp_path / "own", overrides=overrides)
    default = shoal.simulate(
        EXAMPLE, out=tmp_path / "default", overrides=[*overrides, "policy.files=[]"]
    )
    assert sum(row["policy_denied"].get("device_class_refused", 0) for row in own.rows) > 0
    assert all(row["policy_denied"] == {} for row in default.rows)
    database = registry_location(tmp_path / "own", None).open()
    try:
        log = PolicyDecisionLog(database)
        denied = log.decisions("policy", denied_only=True)
        allowed = [d for d in log.decisions("policy") if d.allowed]
    finally:
        database.close()
    assert {d.facts["device_class"] for d in denied} == {"emulator"}
    assert {d.facts["device_class"] for d in allowed} == {"phone"}


def test_a_policy_file_that_does_not_compile_stops_the_run_before_it_starts(
    tmp_path: Path,
) -> None:
    (tmp_path / "broken.rego").write_text("package shoal.policy\nimport rego.v1\ndeny contains [\n")
    (tmp_path / "job.toml").write_text('[policy]\nfiles = ["broken.rego"]\n')
    with pytest.raises(ConfigError, match=r"policy file .*broken.rego: line \d+, column \d+"):
        shoal.simulate(tmp_path / "job.toml", out=tmp_path / "run", rounds=1)
    assert not (tmp_path / "run").exists()


def test_decisions_survive_a_restart(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = job_config(EXAMPLE, ["run.rounds=2"])  # its policy file found beside it
    Simulation(config, out).run()
    resumed = job_config(EXAMPLE, ["run.rounds=4"])
    Simulation(resumed, out, resume=True).run()
    database = registry_location(out, None).open()
    try:
        decisions = PolicyDecisionLog(database).decisions("policy")
    finally:
        database.close()
    assert sorted({d.round for d in decisions}) == [1, 2, 3, 4]
    assert all(len([d for d in decisions if d.round == r]) >= 5 for r in range(1, 5))


TWO_CLIENTS = """package shoal.policy

import rego.v1

deny contains [i, "client_refused", sprintf("%v may not train", [client])] if {
\tsome i
\tclient := input.client_id[i]
\tclient in {"client-00000", "client-00001"}
}
"""


@pytest.mark.parametrize("protocol", ["secagg+", "ckks"])
def test_inside_secure_aggregation_the_policy_decides_on_what_it_can_know(
    tmp_path: Path, protocol: str
) -> None:
    (tmp_path / "two.rego").write_text(TWO_CLIENTS)
    job = {
        "run": {"name": "sealed", "rounds": 2},
        "data": {"num_clients": 12 if protocol == "secagg+" else 5},
        "round": {"clients_per_round": 12 if protocol == "secagg+" else 5, "quorum": 0.5},
        "evaluation": {"every": 0},
        "simulation": {"workers": 0},
        "secure_aggregation": {"protocol": protocol},
        "policy": {"files": [str(tmp_path / "two.rego")]},
    }
    result = shoal.simulate(job, out=tmp_path / "run")
    for row in result.rows:  # the two never enter the sum; the round goes on without them
        assert row["committed"] and row["policy_denied"] == {"client_refused": 2}, row
        assert row["reported"] == row["selected"] - 2
    database = registry_location(tmp_path / "run", None).open()
    try:
        decisions = PolicyDecisionLog(database).decisions("sealed", round_number=1)
    finally:
        database.close()
    facts = decisions[0].facts
    assert facts["sealed"] and facts["l2_norm"] is None and facts["num_examples"] is None
    if protocol == "secagg+":  # every value clipped to +-4 (the protocol's clip), weight capped
        assert facts["l2_norm_bound"] == pytest.approx(4.0 * 650**0.5)
        assert facts["num_examples_bound"] == 1000
    else:  # nothing bounds a silo's encrypted update
        assert facts["l2_norm_bound"] is None and facts["num_examples_bound"] is None


def test_the_policy_sees_each_clients_own_privacy_budget_left(tmp_path: Path) -> None:
    job = {
        "run": {"name": "budget", "rounds": 3, "seed": 2},
        "data": {"num_clients": 6},
        "round": {"clients_per_round": 6, "over_selection": 1.0, "quorum": 0.5},
        "evaluation": {"every": 0},
        "simulation": {"workers": 0},
        "privacy": {"placement": "central", "noise_multiplier": 1.0, "client_epsilon": 1000.0},
    }
    shoal.simulate(job, out=tmp_path / "run")
    database = registry_location(tmp_path / "run", None).open()
    try:
        decisions = PolicyDecisionLog(database).decisions("budget")
    finally:
        database.close()
    left: dict[int, list[float]] = {}
    for decision in decisions:
        left.setdefault(decision.round, []).append(decision.facts["remaining_epsilon"])
    assert all(value == 1000.0 for value in left[1])  # nothing spent before round 1
    spent = [1000.0 - value for value in left[3]]
    assert all(value > 0 for value in spent)  # what rounds 1 and 2 cost each client
    assert max(left[3]) < min(left[2])
