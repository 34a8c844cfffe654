"""The books of the round engine: how rounds run (settings) and what one round has seen."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.aggregation.divergence import DivergenceReport
from shoal.aggregation.drift import DriftReport
from shoal.coordinator.events import Authentication, ClusterSplit, FleetReport, SecureRoundReport
from shoal.coordinator.fallback import DropFallback, FallbackBooks
from shoal.coordinator.homomorphic import CkksRound
from shoal.coordinator.secure import SecureRound
from shoal.coordinator.selection import cohort_size
from shoal.core.compression import Compression
from shoal.core.errors import ConfigError
from shoal.core.later import Later
from shoal.core.limits import quorum_count
from shoal.core.parameters import Vector
from shoal.tasks import Phase


@dataclass(frozen=True, slots=True)
class RoundSettings:
    """How rounds run: cohort sizes, quorum, deadlines, the clients' training, the most
    examples an evaluation may claim as its weight (``max_examples_per_client``; an update's
    bounds are the policy's, :mod:`shoal.governance.policy`), and what a round does when too
    much of its cohort drops (``fallback``), and the codec a plaintext fit round's clients
    upload with (``compression``)."""

    clients_per_round: int
    over_selection: float = 1.3
    quorum: float = 0.8
    deadline_s: float = 600.0
    evaluation_clients: int = 10
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 0.05
    max_examples_per_client: int = 10_000_000
    fallback: DropFallback = field(default_factory=DropFallback)  # when half the cohort drops
    compression: Compression = field(default_factory=Compression)

    def __post_init__(self) -> None:
        cohort_size(target=self.clients_per_round, over_selection=self.over_selection)
        cohort_size(target=self.evaluation_clients, over_selection=self.over_selection)
        if not 0 < self.quorum <= 1:
            raise ConfigError(f"quorum must be in (0, 1], got {self.quorum}")
        if not self.deadline_s > 0:
            raise ConfigError(f"deadline_s must be positive, got {self.deadline_s}")
        if self.max_examples_per_client < 1:
            raise ConfigError(
                f"max_examples_per_client must be >= 1, got {self.max_examples_per_client}"
            )

    def target(self, phase: Phase) -> int:
        return self.clients_per_round if phase is Phase.FIT else self.evaluation_clients

    def quorum_count(self, phase: Phase) -> int:
        return quorum_count(self.quorum, self.target(phase))


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    """A well-formed update waiting for the policy's decision, when its round aggregates."""

    update: Vector
    num_examples: int
    metrics: Mapping[str, float]
    l2_norm: float
    authentication: Authentication


@dataclass(slots=True)
class ClusterBooks:
    """What one cluster's clients reported in a round (clustered FL)."""

    clients: int = 0
    num_examples: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weights: dict[str, float] = field(default_factory=dict)

    def add(self, num_examples: int, metrics: Mapping[str, float]) -> None:
        self.clients += 1
        self.num_examples += num_examples
        add_metrics(self.metric_sums, self.metric_weights, num_examples, metrics)

    def means(self) -> dict[str, float]:
        """Each metric's mean over the cluster's clients that reported it, by examples."""
        return metric_means(self.metric_sums, self.metric_weights, self.num_examples)


def add_metrics(
    sums: dict[str, float],
    weights: dict[str, float],
    num_examples: int,
    metrics: Mapping[str, Any],
) -> None:
    """Add a result's finite numeric ``metrics``, weighted by its examples, to ``sums``, and
    its examples to the ``weights`` of each name it reported."""
    for name, value in metrics.items():
        if isinstance(value, int | float) and math.isfinite(value):
            sums[name] = sums.get(name, 0.0) + float(value) * num_examples
            weights[name] = weights.get(name, 0.0) + num_examples


def metric_means(
    sums: Mapping[str, float], weights: Mapping[str, float], num_examples: int
) -> dict[str, float]:
    """Each metric's mean over the results that reported it, weighted by their examples: a
    result without the metric (or with NaN there) does not pull it towards 0. A sum without
    weights of its own (the round's, set whole) is over all ``num_examples``."""
    if not num_examples:
        return {}
    return {name: total / (weights.get(name) or num_examples) for name, total in sums.items()}


@dataclass(slots=True)
class FleetBooks:
    """When each client of the round was asked and answered, the training time it reported,
    its evaluation's accuracy, and why those that did not count dropped (``[telemetry]``)."""

    sent_at: dict[str, float] = field(default_factory=dict)
    answered_at: dict[str, float] = field(default_factory=dict)
    train_s: list[float] = field(default_factory=list)
    evaluations: dict[str, tuple[int, float]] = field(default_factory=dict)
    drops: Counter[str] = field(default_factory=Counter)  # by reason, as they happen

    def asked(self, clients: list[str], now: float) -> None:
        for client in clients:
            self.sent_at[client] = now

    def answered(self, client: str, now: float, train_s: float | None = None) -> None:
        """The client's result came in at ``now`` (its first, once its task was sent)."""
        if client in self.sent_at and client not in self.answered_at:
            self.answered_at[client] = now
            if train_s is not None:
                self.train_s.append(train_s)

    def report(
        self,
        *,
        reported: set[str],
        unaccounted: int,
        remainder: str,
        deadline_at: float | None,
        deadline_s: float,
    ) -> FleetReport:
        """The round's timings; ``unaccounted`` asked clients dropped with no event, for
        ``remainder``'s reason; ``deadline_at``: the round's (last) deadline (None: each task
        had ``deadline_s``, a secure round's stage deadline)."""
        answered = [client for client in self.answered_at if client in reported]
        sent = [self.sent_at[client] for client in answered]
        back = [self.answered_at[client] for client in answered]
        drops = Counter(self.drops)
        if unaccounted > 0:
            drops[remainder] += unaccounted
        return FleetReport(
            round_trips=tuple(end - start for end, start in zip(back, sent, strict=True)),
            windows=tuple(deadline_s if deadline_at is None else deadline_at - at for at in sent),
            training=tuple(self.train_s),
            evaluations={c: e for c, e in self.evaluations.items() if c in reported},
            drops=dict(sorted(drops.items())),
        )


@dataclass(slots=True)
class RoundBooks:
    """The books of the round in progress."""

    number: int
    phase: Phase
    started_at: float
    cohort: frozenset[str]
    target: int
    aggregation: Any = None
    reported: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    rejected: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # why clients failed, by reason
    num_examples: int = 0
    loss_sum: float = 0.0
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weights: dict[str, float] = field(default_factory=dict)  # the examples of each name
    client_metrics: list[tuple[int, Mapping[str, float]]] = field(default_factory=list)
    config: Mapping[str, Any] = field(default_factory=dict)  # the app's round config
    unclipped: int = 0  # user-level DP: updates that were within the clip norm
    denominator: float | None = None  # user-level DP under Poisson sampling: q * population
    secure: SecureRound | CkksRound | None = None
    secure_report: SecureRoundReport | None = None
    # the policy: updates awaiting it (in arrival order), who it ruled on, its denials by code
    pending: dict[str, PendingUpdate] = field(default_factory=dict)
    policy_decisions: int = 0
    policy_checked: set[str] = field(default_factory=set)
    policy_denied: Counter[str] = field(default_factory=Counter)
    deadline_at: float | None = None  # a plain round's deadline (an extension moves it)
    initial: int = 0  # the cohort's size when the round started
    candidates: tuple[str, ...] = ()  # whom the round could select (replacements come from them)
    fallback: FallbackBooks | None = None
    # the counted updates, for divergence and drift (let go of once both are measured)
    counted: list[tuple[str, Vector]] = field(default_factory=list)
    counted_weights: list[float] = field(default_factory=list)  # kept while a split may come
    # measured here, or in a simulation's idle worker
    divergence: Later[DivergenceReport] | None = None
    drift: Later[DriftReport] | None = None
    clusters: dict[int, ClusterBooks] = field(default_factory=dict)  # clustered FL, by cluster
    fleet: FleetBooks | None = None  # the clients' timings, with [telemetry] enabled
    split: ClusterSplit | None = None  # the model split into cluster models at the commit
    upload_bytes: int | None = None  # the uploads' bytes on the wire, once one told its size

    @property
    def accounted(self) -> int:
        return len(self.reported) + len(self.pending) + len(self.failed)

    def answered(self, client_id: str) -> bool:
        """Whether the client's result is in (counted, awaiting the policy, or failed)."""
        return client_id in self.reported or client_id in self.pending or client_id in self.failed
