"""The run layer's playbook: whom it suspends, by configuration, with and without measures."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.config import PlaybookSection
from shoal.coordinator.playbook import RunPlaybook, Suspects, rolled_back, tally

MEASURED = Suspects(round=3, flagged=("b",), participants=("a", "b", "c"))
SECURE = Suspects(round=3, flagged=None, participants=("a", "b", "c"))  # nobody measured


def playbook(**options: Any) -> RunPlaybook:
    return RunPlaybook(
        PlaybookSection(**options),
        store=None,  # type: ignore[arg-type]  # whom() reads no store
        run_id="r",
        alerts=[],
        central=True,
        restore=lambda record: None,
    )


@pytest.mark.parametrize(
    ("options", "measured", "secure"),
    [
        ({}, ("b",), ("a", "b", "c")),  # flagged; unmeasured falls back to the cohort
        ({"suspend_unmeasured": "none"}, ("b",), ()),
        ({"suspend": "cohort"}, ("a", "b", "c"), ("a", "b", "c")),
        ({"suspend": "none"}, (), ()),
    ],
)
def test_whom_the_playbook_suspends(
    options: dict[str, Any], measured: tuple[str, ...], secure: tuple[str, ...]
) -> None:
    chosen = playbook(**options)
    assert chosen.whom(MEASURED) == measured
    assert chosen.whom(SECURE) == secure


def test_auto_watches_the_central_evaluation_only_when_the_app_has_one() -> None:
    assert playbook().evaluation == "central"
    federated = RunPlaybook(
        PlaybookSection(),
        store=None,  # type: ignore[arg-type]
        run_id="r",
        alerts=[],
        central=False,
        restore=lambda record: None,
    )
    assert federated.evaluation == "federated"
    assert playbook(evaluation="federated").evaluation == "federated"


def test_the_tally_counts_verdicts_rollbacks_and_suspensions() -> None:
    rows = [
        {"playbook": {"verdict": "good", "reasons": []}},
        {"playbook": {"verdict": "bad", "reasons": ["x"], "rolled_back_to": 1, "suspended": 2}},
        {"playbook": {"verdict": "pending", "reasons": []}},
        {"phase": "evaluate"},
    ]
    assert tally(rows) == {"good": 1, "bad": 1, "pending": 1, "rolled_back": 1, "suspended": 2}
    assert [rolled_back(row) for row in rows] == [False, True, False, False]
    assert tally([]) == {"good": 0, "bad": 0, "pending": 0, "rolled_back": 0, "suspended": 0}
