"""A run's privacy from its config: the plan, the engine's DP state, the budget and its records.

Both shells, the simulator and the network coordinator, hold one
:class:`RunPrivacy`: it builds the engine's :class:`DpCoordinator`, and
around each fit round it checks the budget, accounts the committed round in
the ledger and says what the metrics row and the summary record (epsilon,
delta, the noise multiplier, the sampling rate, the accountant).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from shoal.config import Config
from shoal.privacy.budget import PrivacyBudgetKeeper, PrivacyPlan, plan_privacy
from shoal.privacy.coordinator import DpCoordinator, DpSettings
from shoal.privacy.noise import NoiseSource
from shoal.registry.database import Database
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


# the metric of a committed version that holds the clip norm for the round after it
NEXT_CLIP_NORM = "next_clip_norm"


class RunPrivacy:
    """One run's DP: see the module docstring."""

    def __init__(
        self,
        config: Config,
        *,
        population: int,
        clients_per_round: int,
        min_clients: int,
        run_id: str,
    ) -> None:
        section = config.privacy
        self.run_id = run_id
        self.plan: PrivacyPlan = plan_privacy(
            section,
            population=population,
            clients_per_round=clients_per_round,
            rounds=config.run.rounds,
        )
        self._seed = config.run.seed
        noise = (
            NoiseSource.secure()
            if section.secure_noise
            else NoiseSource.seeded(self._round_generator(0))
        )
        self.coordinator = DpCoordinator(
            DpSettings(
                placement=self.plan.placement,  # type: ignore[arg-type]
                noise_multiplier=self.plan.noise_multiplier,
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
        self.alerts: list[AlertHook] = alert_hooks(
            commands=[section.alert_command] if section.alert_command else [],
            functions=[section.alert_hook] if section.alert_hook else [],
        )
        self.locked_reason: str | None = None
        self._keeper: PrivacyBudgetKeeper | None = None

    def open(self, database: Database) -> None:
        """Open the budget in the run's registry database (and replay what was spent)."""
        self._keeper = PrivacyBudgetKeeper(
            self.plan, PrivacyLedger(database), self.run_id, on_exhausted=self._exhausted
        )

    @property
    def keeper(self) -> PrivacyBudgetKeeper:
        if self._keeper is None:
            raise RuntimeError("the run's privacy budget is not open")
        return self._keeper

    def resume(self, head_metrics: Mapping[str, float]) -> None:
        """Take up the clip norm that the run's last committed round left for the next one."""
        norm = head_metrics.get(NEXT_CLIP_NORM)
        if norm is not None and self.coordinator.settings.adaptive_clipping:
            self.coordinator.resume_clip_norm(float(norm))

    def before_round(self, round_number: int) -> str | None:
        """None if the fit round may run; else why training stops."""
        reason = self.keeper.before_round(round_number)
        self.locked_reason = reason
        if not self.coordinator.noise.is_secure:
            # seeded noise (tests) is drawn per round, so a resumed run replays the same noise
            self.coordinator.noise = NoiseSource(self._round_generator(round_number))
        return reason

    def _round_generator(self, round_number: int) -> np.random.Generator:
        return np.random.default_rng([self._seed, 0xD1FF, round_number])

    def barred(self) -> set[str]:
        return self.keeper.barred()

    def row_fields(self, summary: ClosedRound) -> dict[str, Any]:
        """The privacy columns of a fit round's metrics row; a committed round is accounted."""
        fields: dict[str, Any] = {
            "noise_multiplier": self.plan.noise_multiplier,
            "clip_norm": summary.metrics.get("dp_clip_norm", self.coordinator.clip.clip_norm),
        }
        if summary.committed:
            spent = self.keeper.after_round(summary.round, summary.participants)
            fields.update(epsilon=spent.epsilon, delta=spent.delta)
            if self.coordinator.settings.adaptive_clipping:  # kept with the version for a restart
                fields[NEXT_CLIP_NORM] = self.coordinator.clip.clip_norm
        else:
            fields.update(epsilon=self.keeper.epsilon, delta=self.plan.delta)
        return fields

    def summary_fields(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "privacy": plan.placement,
            "epsilon": self.keeper.epsilon,
            "delta": plan.delta,
            "privacy_budget": plan.budget,
            "noise_multiplier": plan.noise_multiplier,
            "sampling_rate": 1.0 if plan.placement == "local" else plan.sampling_rate,
            "accountant": plan.method,
            "conversion": None if plan.method == "pld" else plan.conversion,
            "accounting": plan.label,
            "privacy_locked": self.keeper.locked(),
        }

    def _exhausted(self, round_number: int, epsilon: float, reason: str) -> None:
        budget = self.plan.budget if self.plan.budget is not None else epsilon
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
            except Exception:  # an alert hook's failure never stops the run
                log.exception("a privacy alert hook failed")
