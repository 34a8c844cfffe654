"""The poisoned-model detector, as tables: each trigger at, below and past its threshold."""

from __future__ import annotations

import math

import pytest

from shoal.core.errors import ConfigError
from shoal.governance.playbook import (
    TRIGGERS,
    PlaybookRule,
    Verdict,
    VersionFacts,
    judge_version,
)

GOOD = VersionFacts(
    accuracy=0.9, loss=0.5, divergence_median=1.0, flagged=1, participants=10, step_l2=0.2
)
NAN = math.nan


def test_a_flagged_participant_near_chance_level_is_not_harm() -> None:
    """A DP run near chance (0.18 to 0.14) moves by noise: the absolute floor holds it."""
    judgement = judge_version(
        VersionFacts(accuracy=0.14, flagged=2, participants=11), VersionFacts(accuracy=0.1756)
    )
    assert judgement.verdict is Verdict.GOOD


@pytest.mark.parametrize(
    ("facts", "fired"),
    [
        # nothing moved: GOOD
        (GOOD, ()),
        # accuracy: 30% under 0.9 is 0.63; exactly there passes, below fires, NaN fires
        (VersionFacts(accuracy=0.63, loss=0.5), ()),
        (VersionFacts(accuracy=0.62, loss=0.5), ("accuracy_drop",)),
        (VersionFacts(accuracy=NAN, loss=0.5), ("accuracy_drop",)),
        (VersionFacts(accuracy=0.0, loss=0.5), ("accuracy_drop",)),
        # loss: three times 0.5 passes, above fires; NaN or infinite evaluation or training loss
        (VersionFacts(accuracy=0.9, loss=1.5), ()),
        (VersionFacts(accuracy=0.9, loss=1.51), ("loss",)),
        (VersionFacts(accuracy=0.9, loss=NAN), ("loss",)),
        (VersionFacts(accuracy=0.9, loss=math.inf), ("loss",)),
        (VersionFacts(accuracy=0.9, loss=0.5, training_loss=NAN), ("loss",)),
        # divergence: ten times the GOOD round's median
        (VersionFacts(accuracy=0.9, divergence_median=10.0), ()),
        (VersionFacts(accuracy=0.9, divergence_median=10.5), ("divergence",)),
        (VersionFacts(accuracy=0.9, divergence_median=math.inf), ("divergence",)),
        # flagged share: half of the participants passes, more fires
        (VersionFacts(accuracy=0.9, flagged=5, participants=10), ()),
        (VersionFacts(accuracy=0.9, flagged=6, participants=10), ("flagged_share",)),
        (VersionFacts(accuracy=0.9, flagged=0, participants=0), ()),
        # a flagged participant and a smaller drop: 0.05 under 0.9 (below 5% under it) fires
        (VersionFacts(accuracy=0.85, flagged=1, participants=10), ()),
        (VersionFacts(accuracy=0.84, flagged=1, participants=10), ("flagged_harm",)),
        (VersionFacts(accuracy=0.84, flagged=0, participants=10), ()),  # the drop alone: no
        (VersionFacts(accuracy=0.84, flagged=None, participants=10), ()),  # nobody measured
        # the model's step: ten times the GOOD step
        (VersionFacts(accuracy=0.9, step_l2=2.0), ()),
        (VersionFacts(accuracy=0.9, step_l2=2.01), ("step",)),
        # several at once: one trigger each, in a fixed order
        (
            VersionFacts(accuracy=0.1, loss=9.0, step_l2=5.0, flagged=9, participants=10),
            ("accuracy_drop", "loss", "flagged_share", "flagged_harm", "step"),
        ),
    ],
)
def test_each_trigger_fires_past_its_threshold_and_not_at_it(
    facts: VersionFacts, fired: tuple[str, ...]
) -> None:
    judgement = judge_version(facts, GOOD)
    assert tuple(trigger.name for trigger in judgement.triggers) == fired
    assert judgement.verdict is (Verdict.BAD if fired else Verdict.GOOD)
    assert len(judgement.reasons) == len(fired)


@pytest.mark.parametrize(
    ("facts", "verdict"),
    [
        (VersionFacts(), Verdict.PENDING),  # nothing measured: no verdict yet
        (VersionFacts(step_l2=100.0, divergence_median=50.0), Verdict.PENDING),  # no reference
        (VersionFacts(accuracy=0.01, loss=100.0), Verdict.GOOD),  # no reference to drop from
        (VersionFacts(loss=NAN), Verdict.BAD),  # a NaN loss needs no reference
        (VersionFacts(flagged=3, participants=4), Verdict.BAD),  # nor does the flagged share
    ],
)
def test_without_a_good_version_only_the_absolute_rules_apply(
    facts: VersionFacts, verdict: Verdict
) -> None:
    assert judge_version(facts, None).verdict is verdict


@pytest.mark.parametrize(
    ("good", "accuracy", "fired"),
    [
        (0.18, 0.11, False),  # near chance: 39% lower, but 7 points, is noise
        (0.18, 0.07, True),  # 11 points, and 61% lower
        (0.5, 0.36, False),  # 14 points, but 28% lower
        (0.5, 0.34, True),  # 16 points and 32% lower
        (0.9, 0.64, False),
        (0.9, 0.62, True),
    ],
)
def test_an_accuracy_drop_is_both_relative_and_absolute(
    good: float, accuracy: float, fired: bool
) -> None:
    judgement = judge_version(VersionFacts(accuracy=accuracy), VersionFacts(accuracy=good))
    assert (judgement.verdict is Verdict.BAD) is fired


def test_a_reference_without_a_measure_turns_its_ratio_off() -> None:
    reference = VersionFacts(accuracy=None, loss=0.0, divergence_median=0.0, step_l2=None)
    facts = VersionFacts(accuracy=0.0, loss=5.0, divergence_median=5.0, step_l2=5.0)
    assert judge_version(facts, reference).verdict is Verdict.GOOD


def test_a_version_measured_but_not_evaluated_stays_pending() -> None:
    facts = VersionFacts(divergence_median=1.0, flagged=0, participants=10, step_l2=0.2)
    assert judge_version(facts, GOOD).verdict is Verdict.PENDING


@pytest.mark.parametrize("name", TRIGGERS)
def test_a_trigger_left_out_of_the_rule_never_fires(name: str) -> None:
    bad = VersionFacts(
        accuracy=0.0, loss=NAN, divergence_median=99.0, flagged=10, participants=10, step_l2=99.0
    )
    rule = PlaybookRule(triggers=frozenset(TRIGGERS) - {name})
    fired = {trigger.name for trigger in judge_version(bad, GOOD, rule=rule).triggers}
    assert fired == set(TRIGGERS) - {name}
    assert judge_version(bad, GOOD, rule=PlaybookRule(triggers=frozenset())).verdict is (
        Verdict.GOOD
    )


def test_the_reasons_name_the_trigger_and_what_it_saw() -> None:
    judgement = judge_version(VersionFacts(accuracy=0.45, loss=0.5), GOOD)
    assert judgement.reasons == [
        "accuracy_drop: accuracy 0.45 below 0.63, 30% (and 0.1) under the last GOOD version's 0.9"
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"max_accuracy_drop": 1.5},
        {"min_accuracy_drop": -0.5},
        {"max_flagged_share": -0.1},
        {"max_loss_ratio": 0.5},
        {"max_step_ratio": math.inf},
        {"triggers": frozenset({"accuracy", "loss"})},
    ],
)
def test_a_bad_rule_is_refused(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PlaybookRule(**options)  # type: ignore[arg-type]


def test_facts_come_from_a_row_central_or_federated() -> None:
    row = {
        "round": 3,
        "loss": 0.7,
        "test_accuracy": 0.8,
        "test_loss": 0.4,
        "accuracy": 0.1,  # the clients' own, not what the central evaluation watches
        "divergence_available": True,
        "divergence_median": 2.0,
        "divergence_flagged": 1,
        "reported": 9,
        "model_step_l2": 0.3,
    }
    central = VersionFacts.from_row(row, evaluation="central")
    assert central == VersionFacts(
        accuracy=0.8,
        loss=0.4,
        training_loss=0.7,
        divergence_median=2.0,
        flagged=1,
        participants=9,
        step_l2=0.3,
    )
    federated = VersionFacts.from_row(
        row, evaluation="federated", evaluated={"accuracy": 0.6, "loss": 0.9}
    )
    assert (federated.accuracy, federated.loss) == (0.6, 0.9)
    assert not VersionFacts.from_row(row, evaluation="federated").evaluated
    secure = VersionFacts.from_row({**row, "divergence_available": False}, evaluation="central")
    assert (secure.flagged, secure.divergence_median) == (None, None)  # nobody was measured
