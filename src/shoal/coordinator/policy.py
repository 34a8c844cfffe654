"""The update policy in a run: the facts of each update, from the run's records, for one rule.

The round engine knows what arrived (its norm, its claimed examples, how the
shell authenticated it); the run knows who sent it (the client's registry
record, its versions, its privacy budget left). :class:`RunPolicy` joins the
two into :class:`~shoal.governance.policy.UpdateFacts`, asks the compiled
policy, and keeps every decision in the registry's decision log. The run layer
builds it, so that the simulator and the network coordinator apply the very
same policy.

Where the log is written: the decisions on a round's plaintext updates are
taken as the round closes, and are held until the run writes the round's
records (:meth:`~shoal.coordinator.run.Run.close_round` writes them first
inside its transaction): the version the updates built and the decisions it
was built on commit together, or neither does (a round that rolls back is
decided again when it is played again), in one transaction instead of two. The
decisions become the log's records (each client under its round's pseudonym, the
facts encoded) only there, off the path between the round's last result and its
commit.
A sealed update's decision is taken mid-round, when its client's first message
arrives, and is written at once (with anything still held).

When the engine decides (see :mod:`shoal.coordinator.engine`): a plaintext
round's updates are decided together, in one query, when the round
aggregates (the norm relative to the round's median needs them all); an
update sealed by secure aggregation is decided when its client's first
message of the round arrives, before it can enter the sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from shoal.config import VersionsSection
from shoal.coordinator.eligibility import requirements_of
from shoal.coordinator.events import Authentication
from shoal.coordinator.homomorphic import CKKS
from shoal.coordinator.secure import SecureSettings
from shoal.governance.policy import Decision, PolicyEngine, UpdateFacts
from shoal.governance.pseudonyms import Names
from shoal.privacy.run import RunPrivacy
from shoal.registry import ClientRegistry, Database, DecisionRecord
from shoal.registry.clients import ClientProfile, utc_now
from shoal.registry.decisions import PolicyDecisionLog, facts_json
from shoal.registry.versioning import Requirement, unmet_requirements

log = logging.getLogger("shoal.policy")


@dataclass(frozen=True, slots=True)
class Submission:
    """What the round engine knows of one update when the policy decides on it.

    A ``sealed`` update (SecAgg+, CKKS) has no norm and no example count:
    only the bounds its protocol enforces (``l2_norm_bound``,
    ``num_examples_bound``), None where it enforces none.
    """

    client_id: str
    authentication: Authentication
    l2_norm: float | None = None
    relative_l2_norm: float | None = None
    num_examples: int | None = None
    sealed: bool = False
    l2_norm_bound: float | None = None
    num_examples_bound: int | None = None


class UpdatePolicy(Protocol):
    """The engine's view of the policy: a decision on each submission, in order.

    ``meanwhile``: the engine's work that needs no decision (what the round computes if every
    update is allowed); a policy runs it once, on the calling thread, while it decides, and
    raises its exception, if any, once it has decided.
    """

    def decide(
        self,
        round_number: int,
        submissions: Sequence[Submission],
        *,
        meanwhile: Callable[[], object] | None = None,
    ) -> list[Decision]: ...


def sealed_submission(
    client_id: str, authentication: Authentication, *, secure: SecureSettings, size: int
) -> Submission:
    """What can be known of an update sealed by secure aggregation: the protocol's bounds.

    SecAgg+ clips each of the ``size`` values to ``+-clip`` before it
    quantizes them (an L2 norm of at most ``clip * sqrt(size)``) and caps the
    weight at ``max_weight``; nothing bounds a silo's CKKS ciphertext.
    """
    if secure.protocol == CKKS:
        return Submission(client_id, authentication, sealed=True)
    quantization = secure.quantization
    return Submission(
        client_id,
        authentication,
        sealed=True,
        l2_norm_bound=quantization.clip * math.sqrt(size),
        num_examples_bound=quantization.max_weight,
    )


def relative_norms(norms: Sequence[float]) -> list[float | None]:
    """Each norm over the median of ``norms`` (None for each when the median is 0)."""
    if not norms:
        return []
    ordered = sorted(norms)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    if not (median > 0 and math.isfinite(median)):
        return [None] * len(norms)
    return [norm / median for norm in norms]


@dataclass(frozen=True, slots=True)
class Held:
    """A batch of a round's decisions held to be written, with the time they were taken; its
    log records are made when it is written (:meth:`RunPolicy.write`), in the round's
    transaction, which a simulation's next round trains beside."""

    round: int
    decisions: list[Decision]
    decided_at: datetime


class RunPolicy:
    """The policy of one run over its registry database; see the module docstring."""

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        database: Database,
        run_id: str,
        architecture: str,
        versions: VersionsSection,
        privacy: RunPrivacy | None = None,
        names: Names | None = None,
        granularity_s: int = 1,
    ) -> None:
        self.engine = engine
        self.names = names  # None: the log names clients by their ids
        self.run_id = run_id
        self.architecture = architecture
        self.versions = versions
        self.privacy = privacy
        self.clients = ClientRegistry(database)
        self.log = PolicyDecisionLog(database, granularity_s=granularity_s)
        self._held: list[Held] = []  # decisions not written yet

    def take_held(self) -> list[Held]:
        """The decisions held, no longer held: the round's transaction writes them
        (:meth:`write`); if it rolls back, they go with the round's other records."""
        held, self._held = self._held, []
        return held

    def write(self, held: Sequence[Held]) -> None:
        """Write ``held`` to the decision log, a statement per batch, each with its time;
        inside the caller's write transaction, a part of it."""
        for batch in held:
            records = [self._record(decision, batch.round) for decision in batch.decisions]
            self.log.record(records, now=batch.decided_at)

    def decide(
        self,
        round_number: int,
        submissions: Sequence[Submission],
        *,
        meanwhile: Callable[[], object] | None = None,
    ) -> list[Decision]:
        """Decide on ``submissions`` in one query and log every decision first; ``meanwhile``
        runs during the query (:meth:`PolicyEngine.decide`)."""
        if not submissions:
            if meanwhile is not None:
                meanwhile()
            return []
        ids = [submission.client_id for submission in submissions]
        profiles = self.clients.profiles(ids)
        remaining = {} if self.privacy is None else self.privacy.remaining_epsilon(ids)
        requirements = requirements_of(self.versions, round_number)
        batch = [
            self._facts(
                submission,
                profiles.get(submission.client_id),
                remaining.get(submission.client_id),
                requirements,
            )
            for submission in submissions
        ]
        decisions = self.engine.decide(round_number, batch, meanwhile=meanwhile)
        self._held.append(Held(round_number, decisions, utc_now()))
        if any(submission.sealed for submission in submissions):  # mid-round: at once
            self.write(self.take_held())
        for decision in decisions:
            if not decision.allowed:
                reasons = "; ".join(str(reason) for reason in decision.reasons)
                log.warning(
                    "policy denied the update of %s in round %d: %s",
                    decision.client_id,
                    round_number,
                    reasons,
                )
        return decisions

    def _record(self, decision: Decision, round_number: int) -> DecisionRecord:
        """A decision as the log keeps it: the client under its round's pseudonym, the facts
        encoded."""
        facts = decision.facts.as_record()
        name = decision.facts.client_id
        if self.names is not None:
            name = self.names.of(name, round_number=round_number)
            facts["client_id"] = name
        return DecisionRecord(
            run_id=self.run_id,
            round=round_number,
            client_id=name,
            allowed=decision.allowed,
            reasons=tuple((reason.code, reason.detail) for reason in decision.reasons),
            facts=facts,
            facts_json=facts_json(facts),
        )

    def _facts(
        self,
        submission: Submission,
        profile: ClientProfile | None,
        remaining: float | None,
        requirements: Sequence[Requirement],
    ) -> UpdateFacts:
        problems: tuple[str, ...] = ()
        if profile is not None:
            problems = tuple(unmet_requirements(profile, requirements, model=self.architecture))
        return UpdateFacts(
            client_id=submission.client_id,
            status=profile.status.value.lower() if profile else "unknown",
            device_class=profile.device_class if profile else None,
            app_version=profile.app_version if profile else None,
            runtime_version=profile.runtime_version if profile else None,
            model_architecture_version=profile.model_architecture_version if profile else None,
            feature_extractor_version=profile.feature_extractor_version if profile else None,
            version_problems=problems,
            signature=submission.authentication.value,
            remaining_epsilon=remaining,
            sealed=submission.sealed,
            l2_norm=submission.l2_norm,
            relative_l2_norm=submission.relative_l2_norm,
            num_examples=submission.num_examples,
            l2_norm_bound=submission.l2_norm_bound,
            num_examples_bound=submission.num_examples_bound,
        )
