"""The privacy budget as a resource: plan the noise, account each round, stop before overspending.

A run's :class:`PrivacyPlan` fixes delta (1 / population unless set), the
cohort each round draws (fixed) or expects (Poisson), and the noise
multiplier (given, or calibrated so that ``rounds`` rounds spend exactly the
budget). The population is the eligible population that the first round
saw; every round is then accounted with its own eligible population, from
which the coordinator's sampler draws: each client's chance is
:func:`cohort_sampling_rate` for both. Its :class:`PrivacyBudgetKeeper`
holds the accountant and the ledger in the registry database: before each
round it asks what epsilon the round would lead to, and refuses the round
(locking the run's data, with the reason) when that would pass the budget;
after each committed round it records the round, with the sampling rate it
ran at, and charges its participants. A restarted coordinator rebuilds the
accountant from the ledger's rounds, so nothing is spent twice or forgotten.

A round number can be released more than once. A crash between the
ledger's record and the version's commit leaves a round recorded but never
released: its retry is the same release and is not spent again. But when
HEAD moved back past released rounds (an operator's rollback, an
unlearning), the rounds the run then plays again publish new models under
the old numbers: they are new releases, spent on top of the earlier ones
(which were offered, so stay spent). The run layer tells the keeper, at
resume, which recorded rounds were released (:meth:`PrivacyBudgetKeeper.resume_at`);
when one lies past HEAD, the keeper opens the ledger's next attempt.

Under local DP every client's release is its own Gaussian mechanism, with
no amplification by sampling; the run's epsilon is accounted as if one
client had taken part in every round, an upper bound.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from shoal.config import PrivacySection
from shoal.core.errors import ConfigError, RunError
from shoal.privacy.accounting import (
    Conversion,
    Method,
    PrivacyAccountant,
    Sampling,
    calibrate_noise_multiplier,
    default_delta,
)
from shoal.registry.privacy import PrivacyLedger, PrivacyRound

log = logging.getLogger("shoal.privacy")


def cohort_sampling_rate(*, cohort: int, population: int) -> float:
    """A client's chance to be drawn into a round's cohort: cohort / population, at most 1.

    Poisson sampling's q, and the share of the population a fixed-size draw
    takes. The accountant and the coordinator's sampler both take it from
    here, so the sampling that is accounted is the sampling that runs.

    >>> cohort_sampling_rate(cohort=10, population=400)
    0.025
    """
    if cohort < 1:
        raise ConfigError(f"a round's cohort must hold at least one client, got {cohort}")
    if population < 1:
        raise RunError(
            f"the eligible population is {population}: privacy accounting needs at least "
            "one eligible client to know the sampling rate"
        )
    return min(1.0, cohort / population)


@dataclass(frozen=True, slots=True)
class PrivacyPlan:
    """How a run spends its budget: the noise, delta, the sampling and the accountant.

    ``sample_size`` is the cohort a round draws (fixed) or expects (Poisson);
    ``population`` is the eligible population the plan was made for.
    """

    placement: str
    noise_multiplier: float
    delta: float
    budget: float | None  # the run's epsilon budget; None: account without a limit
    client_budget: float | None
    sample_size: int
    population: int
    method: Method
    sampling: Sampling
    conversion: Conversion

    @property
    def sampling_rate(self) -> float:
        """The rate at the population the plan was made for (1 under local DP)."""
        return self.step().rate

    @property
    def label(self) -> str:
        conversion = "" if self.method == "pld" else f"/{self.conversion}"
        return f"{self.method}/{self.sampling}{conversion}"

    @property
    def accounted_sampling(self) -> Sampling:
        return "poisson" if self.placement == "local" else self.sampling

    def accountant(self) -> PrivacyAccountant:
        conversion = None if self.method == "pld" else self.conversion
        return PrivacyAccountant(
            method=self.method, sampling=self.accounted_sampling, conversion=conversion
        )

    def step(self, population: int | None = None) -> Step:
        """The sampling of a round drawn from ``population`` eligible (unset: the plan's)."""
        population = self.population if population is None else population
        rate = cohort_sampling_rate(cohort=self.sample_size, population=population)
        if self.placement == "local":  # a client's own release: no amplification
            return Step(sampling_rate=1.0)
        if self.sampling == "fixed":
            return Step(sample_size=min(self.sample_size, population), population=population)
        return Step(sampling_rate=rate)

    def replayed_step(self, entry: PrivacyRound) -> Step:
        """The sampling of a round the ledger recorded (its own rate), for a restart."""
        if self.accounted_sampling == "poisson":
            return Step(sampling_rate=entry.sampling_rate)
        population = round(self.sample_size / entry.sampling_rate)  # the rate was size / population
        return self.step(max(population, 1))


@dataclass(frozen=True, slots=True)
class Step:
    """The sampling arguments of one round for :class:`PrivacyAccountant`."""

    sampling_rate: float | None = None
    sample_size: int | None = None
    population: int | None = None

    @property
    def rate(self) -> float:
        """A client's chance to be in the round, as the ledger records it."""
        if self.sampling_rate is not None:
            return self.sampling_rate
        assert self.sample_size is not None and self.population is not None
        return self.sample_size / self.population


def plan_privacy(
    section: PrivacySection, *, population: int, cohort: int, rounds: int
) -> PrivacyPlan:
    """The run's plan for ``population`` eligible clients and a cohort of ``cohort`` per round.

    Calibrates the noise multiplier when only epsilon is given.
    """
    if not section.enabled:
        raise ConfigError("privacy is off: there is nothing to plan")
    delta = section.delta if section.delta is not None else default_delta(population)
    plan = PrivacyPlan(
        placement=section.placement,
        noise_multiplier=section.noise_multiplier or 0.0,
        delta=delta,
        budget=section.epsilon,
        client_budget=section.client_epsilon,
        sample_size=cohort,
        population=population,
        method=section.accountant,
        sampling=section.sampling,
        conversion=section.conversion,
    )
    if section.noise_multiplier is not None:
        return plan
    assert section.epsilon is not None  # the config refuses neither
    step = plan.step()
    calibrated = calibrate_noise_multiplier(
        target_epsilon=section.epsilon,
        delta=delta,
        rounds=rounds,
        method=plan.method,
        sampling=plan.accounted_sampling,
        conversion=None if plan.method == "pld" else plan.conversion,
        sampling_rate=step.sampling_rate,
        sample_size=step.sample_size,
        population=step.population,
    )
    return dataclasses.replace(plan, noise_multiplier=calibrated)


@dataclass(frozen=True, slots=True)
class RoundPrivacy:
    """What one committed round spent: the run's epsilon after it, at delta."""

    epsilon: float
    delta: float


class PrivacyBudgetKeeper:
    """The run's accountant and ledger; see the module docstring."""

    def __init__(
        self,
        plan: PrivacyPlan,
        ledger: PrivacyLedger,
        run_id: str,
        *,
        on_exhausted: Callable[[int, float, str], None] | None = None,
    ) -> None:
        if plan.noise_multiplier <= 0:
            raise ConfigError("privacy.noise_multiplier must be positive: without noise, no DP")
        self.plan = plan
        self.ledger = ledger
        self.run_id = run_id
        self._on_exhausted = on_exhausted
        opened = ledger.budget(run_id)
        ledger.open_budget(  # a budget nothing was spent from yet follows the new plan
            run_id,
            epsilon=plan.budget or _UNLIMITED,
            delta=plan.delta,
            replace=opened is not None and opened.last_round is None,
        )
        self.accountant = plan.accountant()
        recorded = ledger.rounds(run_id)
        self._recorded = {(entry.attempt, entry.round): entry for entry in recorded}
        self.attempt = max((entry.attempt for entry in recorded), default=0)  # rounds go here
        self._steps: dict[int, Step] = {}  # the sampling of each round checked, until accounted
        for entry in self._recorded.values():  # a restart replays what was spent, as it was
            self._compose(plan.replayed_step(entry), entry.noise_multiplier)

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(delta=self.plan.delta)

    def locked(self) -> str | None:
        return self.ledger.locked(self.run_id)

    def refuses(self, *, population: int | None = None) -> bool:
        """Whether :meth:`before_round` would refuse the next round now (the data locked, or
        the budget overspent); nothing is recorded, nothing locked."""
        if self.ledger.locked(self.run_id) is not None:
            return True
        budget = self.plan.budget
        return budget is not None and self._epsilon_after(self.plan.step(population)) > budget

    def _epsilon_after(self, step: Step) -> float:
        """The run's epsilon once a round of ``step`` is spent (inf without a budget: not
        computed)."""
        if self.plan.budget is None:
            return math.inf
        return self.accountant.epsilon_after(
            delta=self.plan.delta,
            noise_multiplier=self.plan.noise_multiplier,
            sampling_rate=step.sampling_rate,
            sample_size=step.sample_size,
            population=step.population,
        )

    def before_round(self, round_number: int, *, population: int | None = None) -> str | None:
        """None if the round may run; else why not (the run is then locked, with that reason).

        ``population``: the eligible clients the round's cohort is drawn from
        (unset: the plan's); the round is accounted at that sampling rate.
        """
        locked = self.ledger.locked(self.run_id)
        if locked is not None:
            return locked
        step = self._steps[round_number] = self.plan.step(population)
        after = self._epsilon_after(step)
        if self.plan.budget is None or after <= self.plan.budget:
            return None
        reason = (
            f"round {round_number} would spend epsilon {after:.4g} of a budget of "
            f"{self.plan.budget:.4g} (delta {self.plan.delta:.3g}, {self.plan.label}): "
            "training stops and the data locks"
        )
        self.ledger.lock(self.run_id, reason=reason)
        log.warning("privacy budget exhausted: %s", reason)
        if self._on_exhausted is not None:
            self._on_exhausted(round_number, self.epsilon, reason)
        return reason

    def resume_at(self, head_round: int, *, released: Collection[tuple[int, int]]) -> None:
        """The run resumes after HEAD's round ``head_round``; ``released`` holds the
        (attempt, round) of every version committed so far (each one a released model).

        When a round of the current attempt past HEAD was released, HEAD moved back past it
        and the rounds now played again are new releases: they go to the next attempt. A
        recorded round past HEAD that was never released (the crash came before its commit)
        is retried in its own attempt, and not spent again.
        """
        moved_back = any(
            (attempt, round_number) in released
            for attempt, round_number in self._recorded
            if attempt == self.attempt and round_number > head_round
        )
        if moved_back:
            self.attempt += 1
            log.info(
                "HEAD moved back to round %d past released rounds: the rounds played again are "
                "new releases, accounted as attempt %d",
                head_round,
                self.attempt,
            )

    def after_round(self, round_number: int, participants: Sequence[str]) -> RoundPrivacy:
        """Account a committed round and charge its participants (once: a crash's retry of a
        recorded round is the same release; a replay after HEAD moved back is a new one)."""
        recorded = self._recorded.get((self.attempt, round_number))
        if recorded is not None:  # a crash came after the ledger's record, before the commit
            return RoundPrivacy(recorded.epsilon, recorded.delta)
        plan = self.plan
        step = self._steps.pop(round_number, None) or plan.step()
        self._compose(step, plan.noise_multiplier)
        epsilon = self.epsilon
        self.ledger.record_round(
            self.run_id,
            round=round_number,
            epsilon=min(epsilon, _UNLIMITED),
            delta=plan.delta,
            noise_multiplier=plan.noise_multiplier,
            sampling_rate=step.rate,
            accountant=plan.label,
            participants=participants,
            client_epsilon=self._client_epsilon(),
            attempt=self.attempt,
        )
        return RoundPrivacy(epsilon, plan.delta)

    def step_of(self, round_number: int) -> Step | None:
        """The sampling ``round_number`` was checked at (None if it was not)."""
        return self._steps.get(round_number)

    def sampling_rate(self) -> float:
        """The sampling rate of the last accounted round (the plan's before any)."""
        history = self.accountant.history
        if not history:
            return self.plan.sampling_rate
        last = history[-1]
        if last.sampling_rate is not None:
            return last.sampling_rate
        assert last.sample_size is not None and last.population is not None
        return last.sample_size / last.population

    def _compose(self, step: Step, noise_multiplier: float) -> None:
        self.accountant.compose(
            noise_multiplier=noise_multiplier,
            sampling_rate=step.sampling_rate,
            sample_size=step.sample_size,
            population=step.population,
        )

    def barred(self) -> set[str]:
        """Clients past their own budget: no longer selected."""
        if self.plan.client_budget is None:
            return set()
        return self.ledger.clients_over_budget(self.run_id, limit=self.plan.client_budget)

    def _client_epsilon(self) -> float:
        """What one participation costs a client: its own Gaussian release, unamplified."""
        single = PrivacyAccountant(method="rdp", sampling="poisson", conversion="improved")
        single.compose(noise_multiplier=self.plan.noise_multiplier, sampling_rate=1.0)
        value = single.epsilon(delta=self.plan.delta)
        return value if math.isfinite(value) else _UNLIMITED


_UNLIMITED = 1e12  # the ledger's stand-in for "no budget"
