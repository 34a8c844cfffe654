"""The poisoned-model detector: a committed version judged GOOD or BAD against the last GOOD one.

Pure: it reads the facts of a version (:class:`VersionFacts`: its
evaluation's accuracy and loss, the training loss of the round that made it,
the round's divergence and the size of the step the aggregate took) and the
facts of the last version marked GOOD, and returns a :class:`Judgement`
with one :class:`Trigger` per rule that fired:

- ``accuracy_drop``: the accuracy fell below ``(1 - max_accuracy_drop)``
  times the GOOD version's (a *relative* drop: 0.3 is 30% of it) and by at
  least ``min_accuracy_drop`` (absolute: near chance level, where a model
  is still finding its way, a relative drop means nothing);
- ``loss``: a loss is NaN or infinite, or the evaluation loss exceeds
  ``max_loss_ratio`` times the GOOD version's;
- ``divergence``: the median distance of the round's updates to their
  aggregate exceeds ``max_divergence_ratio`` times the GOOD round's;
- ``flagged_share``: more than ``max_flagged_share`` of the round's
  participants were flagged as outliers;
- ``flagged_harm``: a participant was flagged as an outlier *and* the
  accuracy fell below ``(1 - max_accuracy_drop_flagged)`` times the GOOD
  version's and by at least ``min_accuracy_drop_flagged``: a smaller drop
  than ``accuracy_drop`` asks for, since the divergence measure names
  suspects (a few poisoned updates that slipped past the policy);
- ``step``: the L2 norm of the step the model took exceeds
  ``max_step_ratio`` times the GOOD version's (the aggregate's own
  behaviour: it exists under secure aggregation too, where no single
  update is seen).

A version with no trigger is GOOD once it has been evaluated (an accuracy or
an evaluation loss), else PENDING: nothing yet says it is sound.

>>> good = VersionFacts(accuracy=0.9, loss=0.3)
>>> judge_version(VersionFacts(accuracy=0.5, loss=0.4), good).verdict
<Verdict.BAD: 'bad'>
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shoal.core.errors import ConfigError

TriggerName = Literal[
    "accuracy_drop", "loss", "divergence", "flagged_share", "flagged_harm", "step"
]
TRIGGERS: tuple[TriggerName, ...] = (
    "accuracy_drop",
    "loss",
    "divergence",
    "flagged_share",
    "flagged_harm",
    "step",
)
Evaluation = Literal["central", "federated"]


class Verdict(enum.StrEnum):
    """What the detector says of a version."""

    GOOD = "good"
    BAD = "bad"
    PENDING = "pending"  # no trigger, but no evaluation yet either


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaybookRule:
    """The detector's thresholds (see the module docstring); ``triggers``: the rules in force."""

    max_accuracy_drop: float = 0.3
    min_accuracy_drop: float = 0.1
    max_loss_ratio: float = 3.0
    max_divergence_ratio: float = 10.0
    max_flagged_share: float = 0.5
    max_accuracy_drop_flagged: float = 0.05
    min_accuracy_drop_flagged: float = 0.05
    max_step_ratio: float = 10.0
    triggers: frozenset[str] = frozenset(TRIGGERS)

    def __post_init__(self) -> None:
        for name in ("max_accuracy_drop_flagged", "min_accuracy_drop_flagged"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.max_accuracy_drop <= 1:
            raise ConfigError(f"max_accuracy_drop must be in [0, 1], got {self.max_accuracy_drop}")
        if not 0 <= self.min_accuracy_drop <= 1:
            raise ConfigError(f"min_accuracy_drop must be in [0, 1], got {self.min_accuracy_drop}")
        if not 0 <= self.max_flagged_share <= 1:
            raise ConfigError(f"max_flagged_share must be in [0, 1], got {self.max_flagged_share}")
        for name in ("max_loss_ratio", "max_divergence_ratio", "max_step_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 1):
                raise ConfigError(f"{name} must be a finite number >= 1, got {value}")
        unknown = set(self.triggers) - set(TRIGGERS)
        if unknown:
            raise ConfigError(f"unknown playbook triggers {sorted(unknown)}; known: {TRIGGERS}")


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionFacts:
    """What is known of one version (None: not measured)."""

    accuracy: float | None = None  # of the evaluation the playbook watches
    loss: float | None = None  # of that evaluation
    training_loss: float | None = None  # the clients' loss while making the version
    divergence_median: float | None = None  # median L2 of the updates to their aggregate
    flagged: int | None = None  # participants flagged as outliers (None: no per-client measure)
    participants: int = 0
    step_l2: float | None = None  # L2 norm of the step from the parent version

    @classmethod
    def from_row(
        cls,
        row: Mapping[str, Any],
        *,
        evaluation: Evaluation,
        evaluated: Mapping[str, Any] | None = None,
    ) -> VersionFacts:
        """The facts of a fit round's metrics ``row``; its evaluation is the row's central
        ``test_*`` columns, or (federated) the ``evaluated`` row of an evaluation round."""
        if evaluation == "central":
            accuracy, loss = row.get("test_accuracy"), row.get("test_loss")
        else:
            accuracy, loss = (evaluated or {}).get("accuracy"), (evaluated or {}).get("loss")
        measured = row.get("divergence_available") is True
        return cls(
            accuracy=_number(accuracy),
            loss=_number(loss),
            training_loss=_number(row.get("loss")),
            divergence_median=_number(row.get("divergence_median")) if measured else None,
            flagged=int(row.get("divergence_flagged") or 0) if measured else None,
            participants=int(row.get("reported") or 0),
            step_l2=_number(row.get("model_step_l2")),
        )

    @property
    def evaluated(self) -> bool:
        return self.accuracy is not None or self.loss is not None


@dataclass(frozen=True, slots=True)
class Trigger:
    """One rule that fired: its name and what it saw, in words."""

    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Judgement:
    """The detector's verdict on a version and the triggers behind a BAD one."""

    verdict: Verdict
    triggers: tuple[Trigger, ...] = ()

    @property
    def reasons(self) -> list[str]:
        return [str(trigger) for trigger in self.triggers]


def judge_version(
    facts: VersionFacts, good: VersionFacts | None, *, rule: PlaybookRule | None = None
) -> Judgement:
    """GOOD, BAD (with a trigger per rule that fired) or PENDING; see the module docstring.

    ``good`` is the last GOOD version's facts (None: no version is GOOD yet,
    so only the rules that need no reference apply).
    """
    rule = rule or PlaybookRule()
    reference = good or VersionFacts()
    checks = {
        "accuracy_drop": _accuracy_drop,
        "loss": _loss,
        "divergence": _divergence,
        "flagged_share": _flagged_share,
        "flagged_harm": _flagged_harm,
        "step": _step,
    }
    fired = []
    for name in TRIGGERS:
        if name in rule.triggers:
            detail = checks[name](facts, reference, rule)
            if detail is not None:
                fired.append(Trigger(name, detail))
    if fired:
        return Judgement(Verdict.BAD, tuple(fired))
    return Judgement(Verdict.GOOD if facts.evaluated else Verdict.PENDING)


def _accuracy_drop(facts: VersionFacts, good: VersionFacts, rule: PlaybookRule) -> str | None:
    return _dropped(facts, good, relative=rule.max_accuracy_drop, absolute=rule.min_accuracy_drop)


def _flagged_harm(facts: VersionFacts, good: VersionFacts, rule: PlaybookRule) -> str | None:
    if not facts.flagged:
        return None
    drop = _dropped(
        facts,
        good,
        relative=rule.max_accuracy_drop_flagged,
        absolute=rule.min_accuracy_drop_flagged,
    )
    return None if drop is None else f"{facts.flagged} participants flagged, and {drop}"


def _dropped(
    facts: VersionFacts, good: VersionFacts, *, relative: float, absolute: float
) -> str | None:
    """Why ``facts``' accuracy fell too far under ``good``'s (None: it did not)."""
    if facts.accuracy is None or good.accuracy is None or not math.isfinite(good.accuracy):
        return None
    floor = min((1 - relative) * good.accuracy, good.accuracy - absolute)
    if math.isnan(facts.accuracy) or facts.accuracy < floor:
        return (
            f"accuracy {facts.accuracy:.4g} below {floor:.4g}, {relative:.0%} "
            f"(and {absolute:g}) under the last GOOD version's {good.accuracy:.4g}"
        )
    return None


def _loss(facts: VersionFacts, good: VersionFacts, rule: PlaybookRule) -> str | None:
    for what, value in (("evaluation loss", facts.loss), ("training loss", facts.training_loss)):
        if value is not None and not math.isfinite(value):
            return f"{what} is {value}"
    if facts.loss is None or good.loss is None or not good.loss > 0:
        return None
    if facts.loss > rule.max_loss_ratio * good.loss:
        return (
            f"evaluation loss {facts.loss:.4g} above {rule.max_loss_ratio:g} times "
            f"the last GOOD version's {good.loss:.4g}"
        )
    return None


def _divergence(facts: VersionFacts, good: VersionFacts, rule: PlaybookRule) -> str | None:
    return _ratio(
        "median divergence",
        facts.divergence_median,
        good.divergence_median,
        rule.max_divergence_ratio,
    )


def _flagged_share(facts: VersionFacts, good: VersionFacts, rule: PlaybookRule) -> str | None:
    if facts.flagged is None or facts.participants <= 0:
        return None
    share = facts.flagged / facts.participants
    if share > rule.max_flagged_share:
        return (
            f"{facts.flagged} of {facts.participants} participants flagged, "
            f"above the share {rule.max_flagged_share:g}"
        )
    return None


def _step(facts: VersionFacts, good: VersionFacts, rule: PlaybookRule) -> str | None:
    return _ratio("model step L2", facts.step_l2, good.step_l2, rule.max_step_ratio)


def _ratio(what: str, value: float | None, reference: float | None, limit: float) -> str | None:
    """``value`` past ``limit`` times a positive ``reference`` (a non-finite value always is)."""
    if value is None:
        return None
    if not math.isfinite(value):
        return f"{what} is {value}"
    if reference is None or not (math.isfinite(reference) and reference > 0):
        return None
    if value > limit * reference:
        return f"{what} {value:.4g} above {limit:g} times the last GOOD version's {reference:.4g}"
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
