"""A run's privacy from its config: the plan, the engine's DP state, the budget and its records.

Both shells, the simulator and the network coordinator, hold one
:class:`RunPrivacy`: it builds the engine's :class:`DpCoordinator`, and
around each fit round it checks the budget, accounts the committed round in
the ledger and says what the metrics row and the summary record (epsilon,
delta, the noise multiplier, the sampling rate, the accountant).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from shoal.config import Config
from shoal.core.errors import ConfigError
from shoal.privacy.budget import PrivacyBudgetKeeper, PrivacyPlan, plan_privacy
from shoal.privacy.coordinator import DpCoordinator, DpSettings
from shoal.privacy.noise import NoiseSource
from shoal.registry.database import Database
from shoal.registry.models import ModelRecord
from shoal.registry.privacy import PrivacyLedger
from shoal.telemetry.alerts import AlertHook, BudgetExhausted, alert_hooks, fire

log = logging.getLogger("shoal.privacy")

ExhaustedHook = Callable[[int, float, str], None]


class ClosedRound(Protocol):
    """What the privacy books need of a closed fit round (the engine's ``RoundSummary``)."""

    @property
    def round(self) -> int: ...

    @property
    def committed(self) -> bool: ...

    @property
    def participants(self) -> tuple[str, ...]: ...

    @property
    def metrics(self) -> Mapping[str, float]: ...


LARGEST_QUIET_DELTA = 1e-3
"""The largest delta a run plans without a warning. (epsilon, delta)-DP allows a mechanism
that publishes each client's data outright with probability delta, so a run of n clients may
expose n * delta of them whole: the usual advice is delta well below 1 / n (Dwork and Roth
2014, section 2.3; DP-FL deployments use 1e-5 to 1e-10). Past one in a thousand, a client's
complete exposure is no longer a negligible chance. The default, 1 / population, crosses it
below 1,000 clients, as tests and small simulations do: warned about, not refused."""

# the metric of a committed version that holds the clip norm for the round after it
NEXT_CLIP_NORM = "next_clip_norm"
# the metric of a committed version that names the ledger's attempt that released it
PRIVACY_ATTEMPT = "privacy_attempt"


def released_round(record: ModelRecord) -> tuple[int, int]:
    """The ledger's (attempt, round) that a committed version released (a version committed
    before attempts were numbered belongs to the first, 0)."""
    return int(record.metrics.get(PRIVACY_ATTEMPT, 0)), record.round


class RunPrivacy:
    """One run's DP: see the module docstring.

    The plan waits for the first fit round: delta (1 / population unless
    set) and a calibrated noise multiplier depend on the eligible population,
    which only the round's candidates establish (a coordinator may start
    before its clients enroll). A restart takes the plan back from the
    ledger once a round has been accounted, so its figures never change.
    """

    def __init__(
        self,
        config: Config,
        *,
        cohort: int,
        clients_per_round: int,
        min_clients: int,
        run_id: str,
    ) -> None:
        section = config.privacy
        if section.noise_multiplier == 0:
            raise ConfigError("privacy.noise_multiplier must be positive: without noise, no DP")
        self.section = section
        self.run_id = run_id
        self.cohort = cohort  # what each fit round draws (fixed) or expects (Poisson)
        self.rounds = config.run.rounds
        self.plan: PrivacyPlan | None = None
        self._seed = config.run.seed
        noise = (
            NoiseSource.secure()
            if section.secure_noise
            else NoiseSource.seeded(self._round_generator(0))
        )
        self.coordinator = DpCoordinator(
            DpSettings(
                placement=section.placement,  # type: ignore[arg-type]
                noise_multiplier=section.noise_multiplier or 0.0,  # calibrated with the plan
                clip_norm=section.clip_norm,
                clients_per_round=clients_per_round,
                min_clients=min_clients,
                adaptive_clipping=section.adaptive_clipping,
                target_quantile=section.target_quantile,
                clip_learning_rate=section.clip_learning_rate,
                clipped_count_std=section.clipped_count_std,
            ),
            noise,
        )
        self.hooks: list[ExhaustedHook] = []  # the shell's own, besides the configured alerts
        self.alerts: list[AlertHook] = alert_hooks(  # its own hooks, then the job's [alerts]
            commands=[
                *([section.alert_command] if section.alert_command else []),
                *config.alerts.commands,
            ],
            functions=[*([section.alert_hook] if section.alert_hook else []), *config.alerts.hooks],
            timeout_s=config.alerts.timeout_s,
        )
        self.locked_reason: str | None = None
        self._ledger: PrivacyLedger | None = None
        self._keeper: PrivacyBudgetKeeper | None = None
        self._population_seen: int | None = None
        self._resumed_at: int | None = None  # HEAD's round, when the run resumed
        self._released: set[tuple[int, int]] = set()

    def open(self, database: Database) -> None:
        """Open the run's ledger; a run that has spent takes its plan back from it."""
        self._ledger = ledger = PrivacyLedger(database)
        budget = ledger.budget(self.run_id)
        if budget is None or budget.last_round is None:
            return  # planned at the first fit round, from its eligible population
        first = ledger.rounds(self.run_id)[0]
        spent = self.section.model_copy(  # the figures the run was accounted with, kept
            update={"delta": budget.delta, "noise_multiplier": first.noise_multiplier}
        )
        population = max(1, round(self.cohort / first.sampling_rate))
        self._adopt(
            plan_privacy(spent, population=population, cohort=self.cohort, rounds=self.rounds)
        )

    @property
    def keeper(self) -> PrivacyBudgetKeeper:
        if self._keeper is None:
            raise RuntimeError("the run's privacy budget is not open")
        return self._keeper

    @property
    def ledger(self) -> PrivacyLedger:
        if self._ledger is None:
            raise RuntimeError("the run's privacy ledger is not open")
        return self._ledger

    def resume(self, head_metrics: Mapping[str, float]) -> None:
        """Take up the clip norm that the run's last committed round left for the next one."""
        norm = head_metrics.get(NEXT_CLIP_NORM)
        if norm is not None and self.coordinator.settings.adaptive_clipping:
            self.coordinator.resume_clip_norm(float(norm))

    def resume_at(self, head: ModelRecord, versions: Iterable[ModelRecord]) -> None:
        """The run resumes from ``head``; ``versions`` are all the versions of its model (each
        a released model): a replayed round whose number was released past HEAD is spent
        again (:meth:`PrivacyBudgetKeeper.resume_at`). Call before :meth:`open`."""
        self._resumed_at = head.round
        self._released = {released_round(record) for record in versions}

    def locked(self) -> str | None:
        """Why the run's data is locked (no more training), or None."""
        budget = self.ledger.budget(self.run_id)
        self.locked_reason = None if budget is None else budget.lock_reason
        return self.locked_reason

    def refuses(self, *, population: int) -> bool:
        """Whether :meth:`before_round` would refuse the next fit round now, or cannot tell yet
        (no round planned the run's privacy); nothing is recorded, nothing locked."""
        return self._keeper is None or self._keeper.refuses(population=population)

    def before_round(self, round_number: int, *, population: int) -> str | None:
        """None if the fit round may run with a cohort drawn from ``population``; else why not.

        The first round plans the run's privacy for that population.
        """
        self._population_seen = population
        if self._keeper is None:
            self._adopt(self._planned(population))
        reason = self.keeper.before_round(round_number, population=population)
        self.locked_reason = reason
        if not self.coordinator.noise.is_secure:
            # seeded noise (tests) is drawn per round, so a resumed run replays the same noise
            self.coordinator.noise = NoiseSource(self._round_generator(round_number))
        return reason

    def saw_population(self, population: int) -> None:
        """The shell's eligible population, when a round could not start (for the summary)."""
        self._population_seen = population

    def _planned(self, population: int) -> PrivacyPlan:
        return plan_privacy(
            self.section, population=population, cohort=self.cohort, rounds=self.rounds
        )

    def _adopt(self, plan: PrivacyPlan) -> None:
        self.plan = plan
        self.coordinator.use_noise_multiplier(plan.noise_multiplier)
        self._keeper = PrivacyBudgetKeeper(
            plan, self.ledger, self.run_id, on_exhausted=self._exhausted
        )
        if self._resumed_at is not None:
            self._keeper.resume_at(self._resumed_at, released=self._released)
        log.info(
            "privacy planned for %d eligible clients: delta %.3g, noise multiplier %.4g, %s",
            plan.population,
            plan.delta,
            plan.noise_multiplier,
            plan.label,
        )
        if plan.delta > LARGEST_QUIET_DELTA:
            self._warn_of_delta(plan)

    def _warn_of_delta(self, plan: PrivacyPlan) -> None:
        """One warning, where the run plans (see :data:`LARGEST_QUIET_DELTA`)."""
        default = self.section.delta is None
        log.warning(
            "delta %.3g (%s) guarantees little: (epsilon, delta)-DP allows each client's data "
            "to be published outright with probability delta, in expectation %.3g of the %d "
            "eligible clients here; set privacy.delta well below 1 / population (1e-5 or so)%s",
            plan.delta,
            f"1 / {plan.population} eligible clients, the default" if default else "privacy.delta",
            plan.delta * plan.population,
            plan.population,
            ", or train with more clients" if default else "",
        )

    def _round_generator(self, round_number: int) -> np.random.Generator:
        return np.random.default_rng([self._seed, 0xD1FF, round_number])

    def barred(self) -> set[str]:
        return set() if self._keeper is None else self._keeper.barred()

    def remaining_epsilon(self, client_ids: Sequence[str]) -> dict[str, float | None]:
        """Each client's own budget left (``client_epsilon`` less its spend); None without one."""
        limit = self.section.client_epsilon
        if limit is None:
            return dict.fromkeys(client_ids)
        if self._keeper is None:  # nothing accounted yet: nothing spent
            return dict.fromkeys(client_ids, limit)
        spent = self.ledger.clients_spent(self.run_id, client_ids)
        return {client: limit - spent[client] for client in client_ids}

    def row_fields(self, summary: ClosedRound) -> dict[str, Any]:
        """The privacy columns of a fit round's metrics row; a committed round is accounted.

        ``population`` and ``sampling_rate`` are the eligible clients the
        round's cohort was drawn from and each one's chance, as accounted.
        """
        clip_norm = summary.metrics.get("dp_clip_norm", self.coordinator.clip.clip_norm)
        if self.plan is None:  # no round could start yet: nothing planned, nothing spent
            return {
                "noise_multiplier": None,
                "clip_norm": clip_norm,
                "epsilon": None,
                "delta": None,
            }
        step = self.keeper.step_of(summary.round)
        fields: dict[str, Any] = {
            "noise_multiplier": self.plan.noise_multiplier,
            "clip_norm": clip_norm,
            "population": self._population_seen,
            "sampling_rate": None if step is None else step.rate,
        }
        if summary.committed:
            spent = self.keeper.after_round(summary.round, summary.participants)
            fields.update(epsilon=spent.epsilon, delta=spent.delta)
            fields[PRIVACY_ATTEMPT] = self.keeper.attempt  # kept with the version it releases
            if self.coordinator.settings.adaptive_clipping:  # kept with the version for a restart
                fields[NEXT_CLIP_NORM] = self.coordinator.clip.clip_norm
        else:
            fields.update(epsilon=self.keeper.epsilon, delta=self.plan.delta)
        return fields

    def summary_fields(self) -> dict[str, Any]:
        plan, keeper = self.plan, self._keeper
        if plan is None and self._population_seen:  # no round ran: what it would have planned
            plan = self._planned(self._population_seen)
        fields: dict[str, Any] = {
            "privacy": self.section.placement,
            "epsilon": 0.0 if keeper is None else keeper.epsilon,
            "privacy_budget": self.section.epsilon,
            "privacy_locked": None if self._ledger is None else self.locked(),
        }
        if plan is None:  # no eligible population was ever seen: nothing was planned
            unplanned = ("sampling_rate", "population", "accountant", "conversion", "accounting")
            return (
                fields
                | dict.fromkeys(unplanned)
                | {
                    "delta": self.section.delta,
                    "noise_multiplier": self.section.noise_multiplier,
                }
            )
        return fields | {
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
            "sampling_rate": plan.sampling_rate if keeper is None else keeper.sampling_rate(),
            "population": self._population_seen or plan.population,
            "accountant": plan.method,
            "conversion": None if plan.method == "pld" else plan.conversion,
            "accounting": plan.label,
        }

    def _exhausted(self, round_number: int, epsilon: float, reason: str) -> None:
        budget = self.section.epsilon if self.section.epsilon is not None else epsilon
        alert = BudgetExhausted(
            run_id=self.run_id,
            round=round_number,
            epsilon_spent=epsilon,
            epsilon_budget=budget,
            reason=reason,
        )
        fire(self.alerts, alert)
        for hook in self.hooks:
            try:
                hook(round_number, epsilon, reason)
            except Exception as exc:  # an alert hook's failure never stops the run
                log.error("a privacy alert hook failed: %s: %s", type(exc).__name__, exc)
                log.debug("the privacy alert hook's traceback", exc_info=exc)
