"""The next round started while the round before commits (``ahead`` of ``Run.close_round``):
its training runs in the pool meanwhile, but nothing of it reaches the engine before the
commit, nothing of it is recorded when the commit fails, and what the round before committed
stays committed when the start fails."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shoal
from shoal.config import Config, load_config, parse_config
from shoal.coordinator.app import ServerApp
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.events import Event, UpdateReceived
from shoal.coordinator.records import RunRecords
from shoal.coordinator.run import Run
from shoal.core.errors import RegistryError, RunError
from shoal.registry.audit import AuditLog
from shoal.registry.privacy import PrivacyLedger
from shoal.simulation import executor
from shoal.simulation.executor import ProcessExecutor
from shoal.simulation.runner import MODEL_NAME, Simulation, open_run_models
from support.jobs import bare_config

ROUNDS = 4


def job(*overrides: str) -> Config:
    return bare_config(
        [
            f"run.rounds={ROUNDS}",
            "data.num_clients=20",
            "round.clients_per_round=5",
            "round.deadline_s=600",
            "evaluation.every=0",
            "simulation.workers=2",
            *overrides,
        ]
    )


@pytest.fixture
def timeline(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """What happened, in order: ("started ahead", round) for each batch a pool started ahead,
    ("update", round) for each update the engine received, ("committed", round) for each
    version whose round's transaction ended."""
    events: list[tuple[str, int]] = []
    start, handle, close_round = ProcessExecutor.start, Coordinator.handle, Run.close_round
    round_transaction = Run._round_transaction
    committing: list[int] = []  # the round whose version close_round is committing

    def starting(self: ProcessExecutor, parameters: Any, jobs: Any, *, ahead: bool = False) -> Any:
        if ahead:
            events.append(("started ahead", jobs[0].config.round))
        return start(self, parameters, jobs, ahead=ahead)

    def handling(self: Coordinator, event: Event) -> Any:
        if isinstance(event, UpdateReceived):
            events.append(("update", event.round))
        return handle(self, event)

    def closing(self: Run, summary: Any, commit: Any, extra: Any, *, ahead: Any = None) -> Any:
        committing[:] = [] if commit is None else [summary.round]
        return close_round(self, summary, commit, extra, ahead=ahead)

    @contextlib.contextmanager
    def transaction(self: Run) -> Iterator[None]:
        with round_transaction(self):
            yield
        if committing:
            events.append(("committed", committing.pop()))

    monkeypatch.setattr(ProcessExecutor, "start", starting)
    monkeypatch.setattr(Coordinator, "handle", handling)
    monkeypatch.setattr(Run, "close_round", closing)
    monkeypatch.setattr(Run, "_round_transaction", transaction)
    return events


def fail_commit(monkeypatch: pytest.MonkeyPatch, *, of_round: int) -> None:
    """The commit of round ``of_round``'s version fails."""
    commit = RunRecords.commit

    def failing(self: RunRecords, *args: Any, round_number: int, **kwargs: Any) -> Any:
        if round_number == of_round:
            raise RegistryError("the disk is full")
        return commit(self, *args, round_number=round_number, **kwargs)

    monkeypatch.setattr(RunRecords, "commit", failing)


def metrics_rounds(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["round"] for line in lines]


def committed_rounds(folder: Path) -> list[int]:
    models = open_run_models(folder)
    try:
        return [record.round for record in models.list(MODEL_NAME)]
    finally:
        models.database.close()


def test_the_next_round_trains_while_the_version_commits_and_is_received_after(
    tmp_path: Path, timeline: list[tuple[str, int]]
) -> None:
    Simulation(job(), tmp_path / "run").run()
    ahead = [number for what, number in timeline if what == "started ahead"]
    assert ahead == list(range(2, ROUNDS + 1))  # every round after the first
    for number in range(2, ROUNDS + 1):
        started = timeline.index(("started ahead", number))
        committed = timeline.index(("committed", number - 1))
        first_update = timeline.index(("update", number))
        assert started < committed < first_update  # trained meanwhile, received after


def test_a_commit_that_fails_records_nothing_of_the_round_started_ahead(
    tmp_path: Path, timeline: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_commit(monkeypatch, of_round=2)
    with pytest.raises(RegistryError, match="the disk is full"):
        Simulation(job(), tmp_path / "run").run()
    assert ("started ahead", 3) in timeline  # round 3 trained while round 2 failed to commit
    assert ("update", 3) not in timeline  # and none of it reached the engine
    assert metrics_rounds(tmp_path / "run") == [1]
    assert committed_rounds(tmp_path / "run") == [0, 1]


def test_a_round_that_cannot_start_leaves_the_round_before_committed(tmp_path: Path) -> None:
    """The next round's start fails while the round before commits: that round commits, is
    recorded, and then the run stops on the start's error."""

    def fit_config(round_number: int) -> dict[str, Any]:
        if round_number == 3:
            raise ValueError("no schedule past round 2")
        return {"learning_rate": 0.1}

    with pytest.raises(RunError, match="fit config failed in round 3: no schedule past round 2"):
        shoal.simulate(job(), server_app=ServerApp(fit_config=fit_config), out=tmp_path / "run")
    assert metrics_rounds(tmp_path / "run") == [1, 2]
    assert committed_rounds(tmp_path / "run") == [0, 1, 2]


def test_a_round_aborted_before_its_first_result_gives_its_batch_back(tmp_path: Path) -> None:
    """Round 2 aborts on its drops before any result arrives, its batch started (and trained)
    all the same: the pool takes that batch's outcomes, and the rounds after it go on."""
    config = job(
        "round.drop_fallback='abort'",
        "devices.classes=[{name='slow', share=1.0, examples_per_second=10.0}]",
        "devices.dropout_waves=[{round=2, dropout=0.6}]",
    )
    Simulation(config, tmp_path / "run").run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(row["round"], row["committed"]) for row in rows] == [
        (1, True),
        (2, False),
        (3, True),
        (4, True),
    ]
    assert rows[1]["reported"] == 0


def test_the_round_after_a_version_the_playbook_rolls_back_starts_after_the_rollback(
    tmp_path: Path, timeline: list[tuple[str, int]]
) -> None:
    """The playbook's BAD verdict rolls HEAD back and suspends clients as its round closes:
    the round after it is not started ahead (the engine, mid-round, could not be restored)."""
    example = Path(__file__).resolve().parents[2] / "examples" / "poisoning.toml"
    config = load_config(example, ["run.rounds=22", "simulation.workers=2"])
    Simulation(config, tmp_path / "run").run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    bad = [row["round"] for row in rows if (row.get("playbook") or {}).get("verdict") == "bad"]
    assert bad and rows[-1]["round"] == 22
    started_ahead = {number for what, number in timeline if what == "started ahead"}
    assert started_ahead and all(number + 1 not in started_ahead for number in bad)


def audit_entries(folder: Path) -> list[tuple[str, str]]:
    models = open_run_models(folder)
    try:
        return [(entry.kind, entry.subject) for entry in AuditLog(models.database).entries()]
    finally:
        models.database.close()


def cross_device(*overrides: str) -> Config:
    """A fleet larger than a round examines: each cohort is enrolled when first asked."""
    example = Path(__file__).resolve().parents[2] / "examples" / "cross-device-eligibility.toml"
    return load_config(
        example,
        [
            "round.clients_per_round=10",
            "evaluation.every=0",
            "simulation.workers=2",
            *overrides,
        ],
    )


def test_a_cohort_started_ahead_is_enrolled_after_the_round_before_commits(
    tmp_path: Path, timeline: list[tuple[str, int]]
) -> None:
    Simulation(cross_device("run.rounds=3"), tmp_path / "run").run()
    entries = audit_entries(tmp_path / "run")
    enrolled = [index for index, (kind, _) in enumerate(entries) if kind == "enroll"]
    assert len(enrolled) == 3 and ("started ahead", 3) in timeline
    for number, at in enumerate(enrolled[1:], 2):  # each after its round before's commit
        assert entries.index(("commit", f"{MODEL_NAME}@v{number - 1}")) < at


def test_a_failed_commit_leaves_the_next_cohort_unenrolled(
    tmp_path: Path, timeline: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_commit(monkeypatch, of_round=2)
    with pytest.raises(RegistryError, match="the disk is full"):
        Simulation(cross_device("run.rounds=4"), tmp_path / "run").run()
    assert ("started ahead", 3) in timeline
    kinds = [kind for kind, _ in audit_entries(tmp_path / "run")]
    assert kinds.count("enroll") == 2  # rounds 1 and 2: round 3's cohort never was


def dp_job() -> Config:
    """Central DP whose budget refuses a round before the sixth; its noise seeded, so that
    every run of it is the same run."""
    return parse_config(
        {
            "run": {"rounds": 6, "seed": 1},
            "data": {"num_clients": 60},
            "round": {"clients_per_round": 10, "deadline_s": 600},
            "evaluation": {"every": 0},
            "simulation": {"workers": 2},
            "privacy": {
                "placement": "central",
                "noise_multiplier": 1.0,
                "epsilon": 2.5,
                "secure_noise": False,
            },
        }
    )


def privacy_lock(folder: Path, run_id: str) -> str | None:
    models = open_run_models(folder)
    try:
        return PrivacyLedger(models.database).locked(run_id)
    finally:
        models.database.close()


@pytest.mark.filterwarnings("ignore::shoal.privacy.noise.InsecureNoiseWarning")
def test_the_budget_refuses_a_round_only_after_the_round_before_commits(
    tmp_path: Path, timeline: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked ahead, a round the budget would refuse is neither started nor refused: the
    refusal (which locks the data and alerts) follows the round before's commit, and none
    comes where that commit fails."""
    config = dp_job()
    Simulation(config, tmp_path / "whole").run()
    *_, last = metrics_rounds(tmp_path / "whole")
    assert 2 < last < 6 and metrics_rounds(tmp_path / "whole") == list(range(1, last + 1))
    assert (lock := privacy_lock(tmp_path / "whole", config.run.name))
    assert f"round {last + 1} would spend" in lock
    assert ("started ahead", last) in timeline and ("started ahead", last + 1) not in timeline

    fail_commit(monkeypatch, of_round=last)
    with pytest.raises(RegistryError, match="the disk is full"):
        Simulation(config, tmp_path / "failed").run()
    assert privacy_lock(tmp_path / "failed", config.run.name) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_an_aborted_round_trains_nothing_more_for_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """A round that aborts before its first result drops its batch: this process trains
    none of it (a worker's replies are read and thrown away), and the batch cannot be
    read after that."""
    trained: list[int] = []
    run_job = executor.run_job

    def counting(factory: Any, parameters: Any, job: Any) -> Any:
        trained.append(job.config.round)
        return run_job(factory, parameters, job)

    monkeypatch.setattr(executor, "run_job", counting)
    config = job(
        f"simulation.workers={workers}",
        "round.drop_fallback='abort'",
        "devices.classes=[{name='slow', share=1.0, examples_per_second=10.0}]",
        "devices.dropout_waves=[{round=2, dropout=0.6}]",
    )
    Simulation(config, tmp_path / "run").run()
    assert 2 not in trained and {1, 3, 4} <= set(trained)
