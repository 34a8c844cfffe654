"""The run layer's poisoned-model playbook: judge each committed version; mark, roll back, suspend.

A fit round's version is judged as it commits (and, where the federated evaluation is
the one watched, HEAD after an evaluation round of it): the detector of
:mod:`shoal.governance.playbook` judges it against the last GOOD version, on the facts of
its metrics row, before the commit (:meth:`RunPlaybook.judge_fit`: a version that will be
rolled back gives the next round no head start), and the verdict is carried out after it
(:meth:`RunPlaybook.after_fit`):

- GOOD: the version is marked GOOD and becomes the reference;
- PENDING: nothing fired but nothing evaluated it yet: it stays CANDIDATE
  and its round's suspects are kept until a verdict;
- BAD: the clients of ``[playbook] suspend`` are suspended (the flagged
  ones of every round since the last GOOD version, or those rounds' whole
  cohorts; a round whose clients could not be measured falls back to
  ``suspend_unmeasured``), the version is marked BAD with its reasons, HEAD
  rolls back to the last GOOD version (the lineage's root when none is),
  the engine takes that version's parameters and optimizer state, and
  :class:`~shoal.telemetry.alerts.ModelRolledBack` goes to the job's hooks.

The steps run in that order so that a crash between any two leaves a state
a resume completes (:func:`resume_point`): a BAD HEAD is rolled back then,
and the round the BAD version came from is not played again (the audit
log's last rollback of the model says whether the playbook made it).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from shoal.config import PlaybookSection
from shoal.coordinator.events import RoundSummary
from shoal.coordinator.records import RunStore
from shoal.core.errors import RegistryError
from shoal.governance.playbook import (
    Evaluation,
    Judgement,
    PlaybookRule,
    Verdict,
    VersionFacts,
    judge_version,
)
from shoal.registry import ModelRecord, ModelStatus
from shoal.telemetry.alerts import AlertHook, ModelRolledBack, fire

log = logging.getLogger("shoal.playbook")

Row = dict[str, Any]
REFERENCE_WINDOW = 10  # GOOD versions whose median step and divergence are the reference
PLAYBOOK = "playbook: "  # how the playbook's verdicts and rollbacks begin their reason
Restore = Callable[[ModelRecord], None]


@dataclass(frozen=True, slots=True)
class FitJudgement:
    """A fit round's version judged on the facts of its row, before it commits."""

    facts: VersionFacts
    judgement: Judgement

    @property
    def rolls_back(self) -> bool:
        """Whether carrying it out rolls HEAD back (and suspends clients): the next round
        then starts from another version, maybe without some of its cohort."""
        return self.judgement.verdict is Verdict.BAD


@dataclass(frozen=True, slots=True)
class Suspects:
    """A fit round not yet judged GOOD: whom it flagged (None: not measured) and its cohort."""

    round: int
    flagged: tuple[str, ...] | None
    participants: tuple[str, ...]


class RunPlaybook:
    """The playbook of one run (see the module docstring).

    ``central``: the server app evaluates each new model (``evaluation =
    "auto"`` then watches that evaluation); ``restore`` puts a version's
    model and optimizer state into the engine.
    """

    def __init__(
        self,
        section: PlaybookSection,
        *,
        store: RunStore,
        run_id: str,
        alerts: Sequence[AlertHook],
        central: bool,
        restore: Restore,
    ) -> None:
        self.section = section
        self.store = store
        self.run_id = run_id
        self.alerts = alerts
        self.restore = restore
        self.rule = PlaybookRule(
            max_accuracy_drop=section.max_accuracy_drop,
            min_accuracy_drop=section.min_accuracy_drop,
            max_loss_ratio=section.max_loss_ratio,
            max_divergence_ratio=section.max_divergence_ratio,
            max_flagged_share=section.max_flagged_share,
            max_accuracy_drop_flagged=section.max_accuracy_drop_flagged,
            min_accuracy_drop_flagged=section.min_accuracy_drop_flagged,
            max_step_ratio=section.max_step_ratio,
            triggers=frozenset(section.triggers),
        )
        watched = section.evaluation
        self.evaluation: Evaluation = (
            "central" if watched == "central" or (watched == "auto" and central) else "federated"
        )
        self.good: VersionFacts | None = None  # the reference: the last GOOD version's facts
        self.good_version: int | None = None
        self.root = 0  # where HEAD goes back to while no version is GOOD
        self.suspects: list[Suspects] = []
        # the last GOOD versions' step and divergence: the reference is their median, not the
        # last one alone (a rule that picks one update, Krum, steps unevenly round to round)
        self._steps: deque[float] = deque(maxlen=REFERENCE_WINDOW)
        self._divergences: deque[float] = deque(maxlen=REFERENCE_WINDOW)

    # --- start ---------------------------------------------------------------------------

    def open(self, head: ModelRecord, rows: Sequence[Row]) -> None:
        """Take the reference from HEAD's lineage: its newest GOOD version, with the row of its
        evaluation (a resumed run judges against what the run had judged GOOD)."""
        record: ModelRecord | None = head
        while record is not None and record.status is not ModelStatus.GOOD:
            self.root = record.version
            record = None if record.parent is None else self.store.version(record.parent)
        if record is None:
            return
        self.good_version = record.version
        self.good = self._facts(record.metrics, rows, version=record.version)
        self._remember(self.good)

    def _facts(self, fit: Row | Any, rows: Sequence[Row], *, version: int) -> VersionFacts:
        evaluated = None
        if self.evaluation == "federated":
            evaluated = next(
                (
                    row
                    for row in reversed(rows)
                    if row.get("phase") == "evaluate"
                    and row.get("committed")
                    and row.get("model_version") == version
                ),
                None,
            )
        return VersionFacts.from_row(fit, evaluation=self.evaluation, evaluated=evaluated)

    # --- a closed round --------------------------------------------------------------------

    def judge_fit(self, row: Row) -> FitJudgement:
        """The verdict on the version a fit round is committing (``row`` is its metrics row,
        NaN kept), for :meth:`after_fit` to carry out once it has committed."""
        facts = VersionFacts.from_row(row, evaluation=self.evaluation)
        return FitJudgement(facts, judge_version(facts, self._reference(), rule=self.rule))

    def after_fit(
        self, summary: RoundSummary, row: Row, *, version: int, judged: FitJudgement
    ) -> Row:
        """Carry out the verdict ``judged`` on ``version``, which a fit round just committed;
        returns the row's ``playbook`` field."""
        report = summary.divergence_report()
        flagged = report.flagged if report is not None and report.available else None
        self.suspects.append(Suspects(summary.round, flagged, summary.participants))
        return self._apply(judged.judgement, judged.facts, version, row)

    def after_evaluation(self, row: Row) -> Row | None:
        """Judge HEAD on a federated evaluation round's ``row``, where that is the evaluation
        watched and HEAD still awaits a verdict; returns the row's ``playbook`` field."""
        if self.evaluation != "federated" or not row.get("committed"):
            return None
        head = self.store.head()
        if head is None or head.status is not ModelStatus.CANDIDATE or head.round == 0:
            return None
        facts = VersionFacts.from_row(head.metrics, evaluation="federated", evaluated=row)
        judgement = judge_version(facts, self._reference(), rule=self.rule)
        return self._apply(judgement, facts, head.version, row)

    def _reference(self) -> VersionFacts | None:
        """The last GOOD version's facts, its step and divergence the recent GOOD median."""
        if self.good is None:
            return None
        step, divergence = self.good.step_l2, self.good.divergence_median
        return replace(
            self.good,
            step_l2=float(np.median(self._steps)) if self._steps else step,
            divergence_median=(
                float(np.median(self._divergences)) if self._divergences else divergence
            ),
        )

    def _remember(self, facts: VersionFacts) -> None:
        if facts.step_l2 is not None:
            self._steps.append(facts.step_l2)
        if facts.divergence_median is not None:
            self._divergences.append(facts.divergence_median)

    def _apply(self, judgement: Judgement, facts: VersionFacts, version: int, row: Row) -> Row:
        fields: Row = {"verdict": judgement.verdict.value, "reasons": judgement.reasons}
        if judgement.verdict is Verdict.GOOD:
            self.store.mark(version, ModelStatus.GOOD, f"{PLAYBOOK}passed ({self.evaluation})")
            self.good, self.good_version, self.suspects = facts, version, []
            self._remember(facts)
        elif judgement.verdict is Verdict.BAD:
            fields |= self._roll_back(judgement, version, round_number=int(row["round"]))
        return fields

    def _roll_back(self, judgement: Judgement, version: int, *, round_number: int) -> Row:
        """Suspend, mark BAD, roll back, restore the engine, alert: in this order (see above)."""
        names = ", ".join(trigger.name for trigger in judgement.triggers)
        why = f"{PLAYBOOK}version {version} of round {round_number} BAD ({names})"
        suspended = self._suspend(why)
        self.store.mark(version, ModelStatus.BAD, PLAYBOOK + "; ".join(judgement.reasons))
        target = self.good_version if self.good_version is not None else self.root
        record = self.store.rollback(target, why)
        self.restore(record)
        self.suspects = []
        log.warning("%s: HEAD back to version %d, %d suspended", why, target, len(suspended))
        fire(
            self.alerts,
            ModelRolledBack(
                run_id=self.run_id,
                round=round_number,
                version=version,
                rolled_back_to=target,
                reasons=tuple(judgement.reasons),
                suspended=len(suspended),
                suspend=self.section.suspend,
            ),
        )
        return {"rolled_back_to": target, "suspended": len(suspended)}

    def _suspend(self, why: str) -> list[str]:
        """Suspend the suspects of the rounds since the last GOOD version, as the job asks."""
        chosen: set[str] = set()
        for suspects in self.suspects:
            chosen |= set(self.whom(suspects))
        for client in sorted(chosen):
            try:
                self.store.suspend(client, why)
            except RegistryError as exc:  # retired meanwhile: it is barred anyway
                log.warning("could not suspend %s: %s", client, exc)
        return sorted(chosen)

    def whom(self, suspects: Suspects) -> tuple[str, ...]:
        """Whom ``[playbook] suspend`` names among one round's suspects."""
        mode = self.section.suspend
        if mode == "flagged" and suspects.flagged is None:
            mode = self.section.suspend_unmeasured  # no client could be measured
        if mode == "flagged":
            return suspects.flagged or ()
        return suspects.participants if mode == "cohort" else ()


# --- resume ----------------------------------------------------------------------------------


def resume_point(store: RunStore, head: ModelRecord) -> tuple[ModelRecord, int, ModelRecord | None]:
    """HEAD to resume from, the last round the run played, and the version the playbook last
    rolled back from, when that rollback is what left HEAD where it is.

    A BAD HEAD (a crash came between the playbook's mark and its rollback,
    or an operator marked it) is rolled back to its newest GOOD ancestor
    first. When the model's last rollback was the playbook's, to HEAD, the
    round of the version it rolled back from was played, and is not played
    again; after any other rollback (an operator's, unlearning's) the rounds
    after HEAD are.
    """
    if head.status is ModelStatus.BAD:
        target = head
        while target.status is not ModelStatus.GOOD and target.parent is not None:
            target = store.version(target.parent)
        by_playbook = (head.status_reason or "").startswith(PLAYBOOK)
        why = f"resuming on version {head.version}, marked BAD"
        head = store.rollback(target.version, f"{PLAYBOOK}{why}" if by_playbook else why)
    last = store.last_rollback()
    if (
        last is None
        or last.from_version is None
        or last.to_version != head.version
        or not (last.reason or "").startswith(PLAYBOOK)
    ):
        return head, head.round, None
    bad = store.version(last.from_version)
    return head, max(head.round, bad.round), bad


def verdict_of(record: ModelRecord) -> Row:
    """The ``playbook`` field of a version's row, as its status tells it (a row rebuilt after
    a crash: the version was judged before the row was to be written)."""
    if record.status is ModelStatus.GOOD:
        return {"verdict": "good", "reasons": []}
    return {"verdict": "pending", "reasons": []}


def recovered_row(bad: ModelRecord, head: ModelRecord) -> Row:
    """The row of a round the playbook rolled back, rebuilt from its version (the crash came
    before the row was written): the row it was committed with, and the verdict."""
    reason = (bad.status_reason or "").removeprefix(PLAYBOOK)
    verdict = {"verdict": "bad", "reasons": [reason], "rolled_back_to": head.version}
    return {
        **bad.metrics,
        "model_version": bad.version,
        "sha256": bad.sha256,
        "playbook": {**verdict, "suspended": None},
    }


def tally(rows: Sequence[Row]) -> dict[str, int]:
    """The summary's ``playbook``: versions judged GOOD, BAD and PENDING, rollbacks, suspensions."""
    counts = {"good": 0, "bad": 0, "pending": 0, "rolled_back": 0, "suspended": 0}
    for row in rows:
        fields = row.get("playbook")
        if not fields:
            continue
        counts[fields["verdict"]] = counts.get(fields["verdict"], 0) + 1
        if fields.get("rolled_back_to") is not None:
            counts["rolled_back"] += 1
            counts["suspended"] += int(fields.get("suspended") or 0)
    return counts


def rolled_back(row: Row) -> bool:
    """Whether the playbook rolled back the version ``row`` committed or evaluated."""
    fields = row.get("playbook") or {}
    return fields.get("rolled_back_to") is not None
