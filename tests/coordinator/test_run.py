"""The run layer alone: first commit, resume, the schedule, the row kept with each version."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from shoal.aggregation.strategy import make_strategy
from shoal.client.api import Client
from shoal.config import load_config
from shoal.coordinator.app import ServerApp
from shoal.coordinator.events import CommitVersion, RoundClosed, StartRound, UpdateReceived
from shoal.coordinator.records import Rollback
from shoal.coordinator.rounds import RoundSettings
from shoal.coordinator.run import Run, RunParts
from shoal.coordinator.schedule import Play, schedule
from shoal.core import Parameters, RunError
from shoal.governance.pseudonyms import Pseudonyms
from shoal.registry import BlobStore, ModelRecord, ModelRegistry, ModelStatus, registry_location
from shoal.tasks import Phase

SETTINGS = RoundSettings(clients_per_round=2, over_selection=1.0, quorum=1.0, deadline_s=10)


class MemoryStore:
    """A run store over a real model registry in a temporary folder, rows kept in memory."""

    def __init__(self, models: ModelRegistry, barred: set[str] | None = None) -> None:
        self.models = models
        self.row_list: list[dict[str, Any]] = []
        self.drift_list: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.reports = 0
        self.config: dict[str, Any] | None = None
        self._barred = barred or set()

    @property
    def database(self) -> Any:
        return self.models.database

    def head(self) -> ModelRecord | None:
        return self.models.head("m")

    def versions(self) -> list[ModelRecord]:
        return self.models.list("m")

    def load(self, record: ModelRecord) -> tuple[Parameters, bytes | None]:
        return self.models.load("m", record.version), self.models.load_state("m", record.version)

    def commit(self, parameters: Parameters, **fields: Any) -> ModelRecord:
        return self.models.commit(
            "m",
            parameters,
            round=fields["round_number"],
            architecture_version=fields["architecture"],
            metrics={k: v for k, v in fields["metrics"].items() if v is not None},
            state=fields["state"],
        )

    def check_anchor(self) -> None:
        return None  # this store holds no key, and so no anchor

    def vouch(self, record: ModelRecord) -> ModelRecord:
        return record  # this store holds no key

    def version(self, number: int) -> ModelRecord:
        return self.models.get("m", number)

    def last_rollback(self) -> Rollback | None:
        entries = self.models.audit.entries(kind="rollback")
        return Rollback.of(entries[-1].details) if entries else None

    def mark(self, number: int, status: ModelStatus, reason: str) -> ModelRecord:
        return self.models.mark("m", number, status, reason=reason)

    def rollback(self, number: int, reason: str) -> ModelRecord:
        return self.models.rollback("m", number, reason=reason)

    def suspend(self, client_id: str, reason: str) -> None:
        self._barred.add(client_id)

    def barred(self) -> set[str]:
        return set(self._barred)

    def pseudonyms(self, run_id: str) -> Pseudonyms:
        return Pseudonyms(b"k" * 32, run_id=run_id)

    def audit_event(self, kind: str, *, subject: str, details: Mapping[str, Any]) -> None:
        self.models.audit.append(kind, subject=subject, details=details)

    def sign_audit_head(self) -> Any:
        return None  # this store holds no key

    def transaction(self) -> Any:
        return self.models.database.write()

    def rows(self) -> list[dict[str, Any]]:
        return list(self.row_list)

    def keep_rows(self, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        self.row_list = [row for row in self.row_list if keep(row)]
        return self.rows()

    def append_row(self, row: dict[str, Any]) -> None:
        self.row_list.append(dict(row))

    def append_drift(self, line: str) -> None:
        self.drift_list.append(json.loads(line))

    def keep_drift(self, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        self.drift_list = [record for record in self.drift_list if keep(record)]
        return list(self.drift_list)

    def write_config(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def read_config(self) -> Mapping[str, Any] | None:
        return self.config

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.summary = dict(summary)

    def write_report(self) -> None:
        self.reports += 1


@pytest.fixture
def models(tmp_path: Any) -> ModelRegistry:
    database = registry_location(tmp_path, None).open()
    return ModelRegistry(database, BlobStore(str(tmp_path / "blobs")))


class Zeros(Client):
    """A client whose model starts at zero (it is asked only for its parameters)."""

    def get_parameters(self) -> Parameters:
        return Parameters.from_arrays([np.zeros(3, np.float32)])

    def fit(self, parameters: Parameters, config: Any) -> Any:
        raise AssertionError("not trained here")

    def evaluate(self, parameters: Parameters, config: Any) -> Any:
        raise AssertionError("not evaluated here")


initial = Zeros


def test_the_server_app_initial_model_comes_first(models: ModelRegistry) -> None:
    start = Parameters.from_arrays([np.full(3, 7.0, np.float32)])
    app = ServerApp(initial_parameters=lambda context: start)
    engine = make_run(MemoryStore(models), app=app).open(initial)
    np.testing.assert_array_equal(engine.parameters.vector, 7.0)


def test_a_list_of_arrays_from_initial_parameters_is_the_model(models: ModelRegistry) -> None:
    """As a FitResult takes one: before, a list raised AttributeError deep in the engine."""
    app = ServerApp(initial_parameters=lambda context: [np.full(3, 7.0, np.float32)])
    engine = make_run(MemoryStore(models), app=app).open(initial)
    np.testing.assert_array_equal(engine.parameters.vector, 7.0)


@pytest.mark.parametrize("made", [None, 3.0, {"w": np.zeros(3)}])
def test_an_initial_model_of_another_kind_is_one_line(models: ModelRegistry, made: Any) -> None:
    app = ServerApp(initial_parameters=lambda context: made)
    with pytest.raises(RunError, match=f"initial_parameters returned {type(made).__name__}: give"):
        make_run(MemoryStore(models), app=app).open(initial)
    assert models.names() == []  # nothing was committed


def make_run(
    store: MemoryStore,
    *,
    app: ServerApp | None = None,
    settings: tuple[str, ...] = (),
    **options: Any,
) -> Run:
    config = load_config(
        None,
        [
            "run.rounds=4",
            "evaluation.every=2",
            "data.num_clients=4",
            "round.clients_per_round=2",
            *settings,
        ],
    )
    return Run(
        config,
        app=app or ServerApp(),
        store=store,  # type: ignore[arg-type]
        parts=RunParts(SETTINGS, make_strategy("fedavg")),
        architecture="tiny",
        **options,
    )


def play_fit(run: Run, round_number: int) -> dict[str, Any]:
    """One fit round where both clients move the model by one."""
    engine = run.coordinator
    play = Play(round_number, Phase.FIT)
    engine.handle(StartRound(round_number, Phase.FIT, 0.0, ("a", "b"), run.round_config(play)))
    actions: list[Any] = []
    for client in ("a", "b"):
        update = np.ones(3, np.float32)
        actions += engine.handle(UpdateReceived(client, round_number, 1.0, update, 5, {"f1": 0.5}))
    commit = next(a for a in actions if isinstance(a, CommitVersion))
    summary = next(a for a in actions if isinstance(a, RoundClosed)).summary
    row = run.close_round(summary, commit, {"wall_time_s": float(round_number)})
    run.record(row)
    return row


def test_the_schedule_interleaves_evaluations_and_stops_when_asked() -> None:
    plays = list(schedule(rounds=4, evaluate_every=2, stops_before=lambda r: r == 4))
    assert [(p.round, p.phase.value) for p in plays] == [
        (1, "fit"),
        (2, "fit"),
        (2, "evaluate"),
        (3, "fit"),
    ]
    assert list(schedule(rounds=0)) == []


def test_a_new_run_commits_its_initial_model_as_version_zero(models: ModelRegistry) -> None:
    store = MemoryStore(models)
    run = make_run(store, resume=False)
    run.open(initial)
    head = store.head()
    assert head is not None and (head.version, head.round) == (0, 0)
    assert head.architecture_version == "tiny"
    assert store.config is not None and store.config["run"]["rounds"] == 4


def test_each_committed_round_keeps_its_row_and_the_app_evaluates_it(
    models: ModelRegistry,
) -> None:
    evaluated: list[int] = []

    def evaluate(parameters: Parameters, round_number: int) -> dict[str, float]:
        evaluated.append(round_number)
        return {"loss": 0.25, "accuracy": 0.75}

    store = MemoryStore(models)
    run = make_run(store, app=ServerApp(evaluate=evaluate))
    run.open(initial)
    row = play_fit(run, 1)
    assert evaluated == [1]
    assert (row["test_loss"], row["test_accuracy"], row["accuracy"]) == (0.25, 0.75, 0.75)
    assert row["f1"] == 0.5  # the clients' own metric, by name
    head = store.head()
    assert head is not None and head.metrics["test_accuracy"] == 0.75
    assert row["model_version"] == head.version == 1


def test_a_resume_continues_after_head_and_replays_a_due_evaluation(
    models: ModelRegistry,
) -> None:
    store = MemoryStore(models)
    first = make_run(store)
    first.open(initial)
    play_fit(first, 1)
    play_fit(first, 2)  # its evaluation (every 2) never ran: the process stopped here
    again = make_run(store, resume=True)
    again.open(initial)
    assert [(p.round, p.phase) for p in again.plays()][:2] == [
        (2, Phase.EVALUATE),
        (3, Phase.FIT),
    ]
    np.testing.assert_allclose(again.coordinator.parameters.vector, 2.0)
    assert again.wall_offset == 2.0


def test_a_row_lost_in_a_crash_is_rebuilt_from_its_version(models: ModelRegistry) -> None:
    store = MemoryStore(models)
    run = make_run(store)
    run.open(initial)
    play_fit(run, 1)
    store.row_list.clear()  # the crash came after the commit, before the row
    make_run(store, resume=True).open(initial)
    assert [row["round"] for row in store.row_list] == [1]
    assert store.row_list[0]["model_version"] == 1


def test_resume_and_fresh_start_are_refused_where_they_cannot_work(
    models: ModelRegistry,
) -> None:
    store = MemoryStore(models)
    with pytest.raises(RunError, match="no committed version"):
        make_run(store, resume=True).open(initial)
    make_run(store, resume=False).open(initial)
    with pytest.raises(RunError, match="already holds a run"):
        make_run(store, resume=False).open(initial)


def test_barred_clients_are_never_eligible(models: ModelRegistry) -> None:
    run = make_run(MemoryStore(models, barred={"b"}))
    assert run.eligible(["a", "b", "c"]) == ("a", "c")


def test_the_app_round_config_reaches_the_task_and_a_bad_one_is_one_clear_error(
    models: ModelRegistry,
) -> None:
    app = ServerApp(fit_config=lambda r: {"learning_rate": 0.5 / r, "tag": f"r{r}"})
    run = make_run(MemoryStore(models), app=app)
    engine = run.open(initial)
    actions = engine.handle(
        StartRound(2, Phase.FIT, 0.0, ("a", "b"), run.round_config(Play(2, Phase.FIT)))
    )
    task = next(a for a in actions if hasattr(a, "config"))
    assert task.config.learning_rate == 0.25
    assert task.config.extras == {"tag": "r2"}
    broken = make_run(MemoryStore(models), app=ServerApp(fit_config=lambda r: {"x": [1]}))
    with pytest.raises(RunError, match="fit config"):
        broken.round_config(Play(1, Phase.FIT))


def test_the_summary_holds_the_run_output_contract(models: ModelRegistry) -> None:
    store = MemoryStore(models)
    run = make_run(store)
    run.open(initial)
    play_fit(run, 1)
    summary = run.finish({"clients": 2})
    for key in (
        "rounds_completed",
        "final_accuracy",
        "final_loss",
        "wall_time_s",
        "virtual_time_s",
        "num_parameters",
        "bytes_up",
        "bytes_down",
    ):
        assert key in summary
    assert summary["rounds_completed"] == 1 and summary["clients"] == 2
    assert store.summary == summary
    assert store.reports == 1  # the report, written once at the end


def test_the_report_is_not_written_when_switched_off(models: ModelRegistry) -> None:
    store = MemoryStore(models)
    run = make_run(store, settings=("report.enabled=false",))
    run.open(initial)
    play_fit(run, 1)
    run.finish()
    assert store.summary is not None and store.reports == 0


def test_the_policy_of_each_round_and_the_excluded_it_counts(models: ModelRegistry) -> None:
    """[[versions.require]] applies from its round on, as the schedule reaches it; each row
    counts the clients every criterion of the policy turned away, zero included."""
    config = load_config(
        None,
        [
            "run.rounds=3",
            "evaluation.every=0",
            "selection.require_charging=true",
            "selection.min_ram_gb=2",
            "versions.require=[{component='app', minimum='2.4', from_round=2},"
            " {component='runtime', allowed=['1.2'], from_round=3}]",
        ],
    )
    run = Run(
        config,
        app=ServerApp(),
        store=MemoryStore(models),  # type: ignore[arg-type]
        parts=RunParts(SETTINGS, make_strategy("fedavg")),
        architecture="tiny",
    )
    run.open(initial)
    seen = []
    for _ in run.plays():
        criteria = run.selection_criteria()
        seen.append([r.component.value for r in criteria.requirements])
        assert (criteria.model, criteria.require_charging, criteria.min_ram_gb) == ("tiny", True, 2)
        assert not criteria.require_wifi and criteria.seen_within is None
    assert seen == [[], ["app"], ["app", "runtime"]]
    row = play_fit(run, 1)
    assert row["excluded"] == {"charging": 0, "ram": 0, "versions": 0}
    engine = run.coordinator
    engine.handle(StartRound(2, Phase.FIT, 0.0, ("a", "b"), {}))
    actions: list[Any] = []
    for client in ("a", "b"):
        update = np.ones(3, np.float32)
        actions += engine.handle(UpdateReceived(client, 2, 1.0, update, 5, {}))
    summary = next(a for a in actions if isinstance(a, RoundClosed)).summary
    tallied = replace(summary, excluded={"charging": 3, "versions": 1, "status": 2})
    row = run.close_round(tallied, None, {})
    assert row["excluded"] == {"charging": 3, "ram": 0, "versions": 1}  # policy names only
