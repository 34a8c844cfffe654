"""The deterministic simulator: the coordinator driven by a discrete-event loop in virtual time.

Each round, the coordinator picks a cohort; the device fleet says when each
client's result would arrive (or that it never will); events are delivered
in virtual-time order until the round closes. Local training runs for real,
only for the results the coordinator will actually receive, batched over
the executor's workers. Nothing sleeps, and the same seed gives the same run.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.config import Config, config_to_dict, parse_config
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.events import (
    Action,
    ClientFailed,
    CommitVersion,
    DeadlineReached,
    EvaluationReceived,
    Event,
    RoundClosed,
    RoundSummary,
    ScheduleDeadline,
    SendEvaluateTask,
    SendFitTask,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.setup import (
    round_settings_from_config,
    secure_settings_from_config,
    strategy_from_config,
)
from shoal.core.device import DeviceState
from shoal.core.errors import RunError
from shoal.core.parameters import Parameters
from shoal.core.transforms import state_from_bytes, state_to_bytes
from shoal.privacy.run import RunPrivacy
from shoal.registry import (
    BlobStore,
    ClientRegistry,
    ModelRecord,
    ModelRegistry,
    blob_location,
    registry_location,
)
from shoal.simulation.consortium import Consortium
from shoal.simulation.devices import Attempt, DeviceFleet
from shoal.simulation.executor import Executor, Job, Outcome, make_executor
from shoal.simulation.record_privacy import RecordLevelLedger
from shoal.simulation.scenario import Scenario, build_scenario
from shoal.simulation.secure_rounds import SecureRoundPlayer, secure_row_fields
from shoal.tasks import Phase
from shoal.telemetry.metrics import MetricsLog, clean_row
from shoal.telemetry.tracking import MlflowTracker

RoundCallback = Callable[[dict[str, Any]], None]

MODEL_NAME = "global"
_CONFIG_FILE = "config.json"
_SUMMARY_FILE = "summary.json"
_METRICS_FILE = "metrics.jsonl"
_EVALUATION_UPLOAD_BYTES = 256


@dataclass(slots=True)
class _Delivery:
    """A result on its way to the coordinator, ordered by virtual arrival time."""

    at: float
    order: int
    client_id: str

    def __lt__(self, other: _Delivery) -> bool:
        return (self.at, self.order) < (other.at, other.order)


class Simulation:
    """One simulated run in ``out``; ``resume=True`` continues the run found there."""

    def __init__(self, config: Config, out: str | Path, *, resume: bool = False) -> None:
        self.config = config
        self.out = Path(out)
        self.resume = resume
        self.scenario: Scenario = build_scenario(config)
        self.fleet = DeviceFleet(self.scenario.client_ids, config.devices, seed=config.run.seed)
        self.strategy = strategy_from_config(config)
        self.settings = round_settings_from_config(config, population=len(self.scenario.client_ids))
        initial = self.scenario.initial_parameters()
        self.consortium: Consortium | None = None
        if config.secure_aggregation.protocol == "ckks":
            self.out.mkdir(parents=True, exist_ok=True)
            self.consortium = Consortium(
                self.out, config.secure_aggregation, self.scenario.client_ids
            )
        self.privacy: RunPrivacy | None = None
        if config.privacy.enabled:
            self.privacy = RunPrivacy(
                config,
                population=len(self.scenario.client_ids),
                clients_per_round=self.settings.clients_per_round,
                min_clients=self.settings.quorum_count(Phase.FIT),
                run_id=config.run.name,
            )
        self.coordinator = Coordinator(
            settings=self.settings,
            strategy=self.strategy,
            parameters=initial,
            seed=config.run.seed,
            privacy=None if self.privacy is None else self.privacy.coordinator,
            secure=secure_settings_from_config(
                config,
                run_id=config.run.name,
                public_context=None if self.consortium is None else self.consortium.public_context,
                silo_keys=None if self.consortium is None else self.consortium.public_keys,
            ),
        )
        self.model_bytes = len(initial.to_bytes())
        self.metrics = MetricsLog(self.out / _METRICS_FILE)
        self._models: ModelRegistry | None = None
        self._clients: ClientRegistry | None = None
        self._tracker: MlflowTracker | None = None
        self._records = RecordLevelLedger()  # record-level DP-SGD, when clients run it

    @property
    def models(self) -> ModelRegistry:
        """The run's model registry (SQLite and blobs in the run folder), opened on first use."""
        if self._models is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._models = open_run_models(self.out)
        return self._models

    def _head(self) -> ModelRecord | None:
        return self.models.head(MODEL_NAME)

    @property
    def clients(self) -> ClientRegistry:
        """The run's client registry: the simulated population, in the models' database."""
        if self._clients is None or self._clients.database is not self.models.database:
            self._clients = ClientRegistry(self.models.database)
        return self._clients

    def _enroll_fleet(self) -> None:
        """Enroll the simulated population; clients enrolled before keep their status."""
        devices = {
            client: DeviceState(device_class=self.fleet.device_class(client).name)
            for client in self.scenario.client_ids
        }
        self.clients.enroll_population(devices)

    # --- public ---------------------------------------------------------------------------

    def run(self, *, on_round: RoundCallback | None = None) -> dict[str, Any]:
        """Play every remaining round; returns the summary also written to summary.json."""
        started = time.perf_counter()
        if self.config.tracking.mlflow:
            self.out.mkdir(parents=True, exist_ok=True)
            self._tracker = MlflowTracker(
                run_name=self.config.run.name,
                folder=self.out,
                tracking_uri=self.config.tracking.tracking_uri,
                experiment_name=self.config.tracking.experiment,
            )
            self._tracker.log_params(config_to_dict(self.config))
        finished = False
        try:
            summary = self._run(started, on_round)
            finished = True
            return summary
        finally:
            if self._tracker is not None:
                self._tracker.end(status="FINISHED" if finished else "FAILED")
            if self._models is not None:
                self._models.database.close()
                self._models = None

    def _run(self, started: float, on_round: RoundCallback | None) -> dict[str, Any]:
        first_round, now, wall_offset = self._prepare()
        with self._executor() as executor:
            plays: list[tuple[int, Phase]] = []
            if first_round > 1 and self._evaluation_due(first_round - 1):
                plays.append(
                    (first_round - 1, Phase.EVALUATE)
                )  # the crash came before it was recorded
            for round_number in range(first_round, self.config.run.rounds + 1):
                plays.append((round_number, Phase.FIT))
                if self._evaluation_due(round_number):
                    plays.append((round_number, Phase.EVALUATE))
            if self.privacy is not None:
                self.privacy.open(self.models.database)
            for round_number, phase in plays:
                if self._privacy_stops(round_number, phase):
                    break
                row = self._play(executor, round_number, phase, now)
                now = self._emit(row, started, wall_offset, on_round)["virtual_time_s"]
        summary = self._summary()
        (self.out / _SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return summary

    def _privacy_stops(self, round_number: int, phase: Phase) -> bool:
        """Before a fit round that would pass the privacy budget, training stops."""
        if self.privacy is None or phase is not Phase.FIT:
            return False
        return self.privacy.before_round(round_number) is not None

    # --- setup and resume ---------------------------------------------------------------

    def _prepare(self) -> tuple[int, float, float]:
        """The first round to play, the virtual time and wall time already spent."""
        self.out.mkdir(parents=True, exist_ok=True)
        head = self._head()
        if not self.resume:
            if head is not None or self.metrics.path.exists():
                raise RunError(f"{self.out} already holds a run; use --resume or another --out")
            (self.out / _CONFIG_FILE).write_text(
                json.dumps(config_to_dict(self.config), indent=2) + "\n"
            )
            self._enroll_fleet()
            self._commit_initial()
            return 1, 0.0, 0.0
        if head is None:
            raise RunError(f"{self.out} holds no committed version to resume from")
        self._restore(head)
        self._enroll_fleet()
        rows = self.metrics.truncate(
            lambda row: (
                row["round"] < head.round or (row["round"] == head.round and row["phase"] == "fit")
            )
        )
        wall = max((row.get("wall_time_s", 0.0) for row in rows), default=0.0)
        if head.round > 0 and not any(row["round"] == head.round for row in rows):
            # the crash came between committing the version and logging its row
            recovered = {**head.metrics, "model_version": head.version, "sha256": head.sha256}
            self.metrics.append({**recovered, "wall_time_s": wall})
        return head.round + 1, float(head.metrics.get("virtual_time_s", 0.0)), wall

    def _commit(
        self, parameters: Parameters, *, round_number: int, metrics: dict[str, Any]
    ) -> ModelRecord:
        return self.models.commit(
            MODEL_NAME,
            parameters,
            round=round_number,
            architecture_version=self.config.model.kind,
            metrics=clean_row(metrics),
            state=state_to_bytes(self.coordinator.optimizer_state),
        )

    def _commit_initial(self) -> None:
        self._commit(self.coordinator.parameters, round_number=0, metrics={"virtual_time_s": 0.0})

    def _restore(self, head: ModelRecord) -> None:
        parameters = self.models.load(MODEL_NAME, head.version)
        template = self.strategy.server_optimizer.init(parameters.vector)
        saved = self.models.load_state(MODEL_NAME, head.version)
        state = template if saved is None else state_from_bytes(template, saved)
        self.coordinator.restore(parameters, state)
        if self.privacy is not None:
            self.privacy.resume(head.metrics)

    @contextmanager
    def _executor(self) -> Iterator[Executor]:
        settings = self.config.simulation
        executor = make_executor(
            self.scenario.client_factory(),
            workers=settings.workers,
            backend=settings.backend,
            ray_address=settings.ray_address,
        )
        try:
            yield executor
        finally:
            executor.close()

    def _evaluation_due(self, round_number: int) -> bool:
        every = self.config.evaluation.every
        return every > 0 and round_number % every == 0

    # --- one round ------------------------------------------------------------------------

    def _play(
        self, executor: Executor, round_number: int, phase: Phase, now: float
    ) -> dict[str, Any]:
        """Run one round in virtual time; returns its metrics row (without wall time)."""
        barred = self.clients.barred()  # an operator's `shoal clients suspend` bans a device
        if self.privacy is not None:
            barred |= self.privacy.barred()  # clients past their own privacy budget
        candidates = tuple(c for c in self.fleet.available(round_number) if c not in barred)
        actions = self.coordinator.handle(StartRound(round_number, phase, now, candidates))
        tasks = {a.client_id: a for a in actions if isinstance(a, SendFitTask | SendEvaluateTask)}
        closed = _closed(actions)
        if closed is not None:
            return self._row(closed, attempts={}, uploads=0, commit=None)
        if phase is Phase.FIT and self.coordinator.secure is not None:
            return self._play_secure(executor, round_number, actions, now)
        deadline = next(a.at for a in actions if isinstance(a, ScheduleDeadline))
        attempts = {
            client: self.plan_attempt(task, now, deadline) for client, task in tasks.items()
        }
        arrivals = sorted(
            _Delivery(attempt.arrives_at, index, client)
            for index, (client, attempt) in enumerate(attempts.items())
            if attempt.arrives_at is not None and attempt.arrives_at <= deadline
        )
        outcomes: dict[str, Outcome] = {}
        queue = [*arrivals, _Delivery(deadline, len(attempts), "")]
        heapq.heapify(queue)
        uploads, commit = 0, None
        while queue:
            delivery = heapq.heappop(queue)
            if not delivery.client_id:
                actions = self.coordinator.handle(DeadlineReached(round_number, delivery.at))
            else:
                if delivery.client_id not in outcomes:
                    self._compute(executor, phase, tasks, attempts, arrivals, outcomes, delivery)
                uploads += 1
                actions = self.coordinator.handle(
                    self._event(outcomes[delivery.client_id], round_number, delivery.at)
                )
            commit = next((a for a in actions if isinstance(a, CommitVersion)), commit)
            closed = _closed(actions)
            if closed is not None:
                counted = set(closed.participants)
                self._records.add_all(
                    (client, outcome.metrics)
                    for client, outcome in outcomes.items()
                    if client in counted and phase is Phase.FIT
                )
                return self._row(closed, attempts=attempts, uploads=uploads, commit=commit)
        raise RunError(f"round {round_number} never closed")  # the deadline always closes it

    def _play_secure(
        self, executor: Executor, round_number: int, actions: list[Action], now: float
    ) -> dict[str, Any]:
        player = SecureRoundPlayer(self, executor, round_number)
        summary, commit = player.play(actions, now)
        traffic = player.traffic
        return self._row(
            summary,
            attempts=traffic.attempts,
            uploads=traffic.masked_inputs,
            commit=commit,
            extra=secure_row_fields(summary, traffic),
        )

    def plan_attempt(
        self, task: SendFitTask | SendEvaluateTask, now: float, deadline: float
    ) -> Attempt:
        """What the fleet says the client does with ``task``: when it answers, or that it drops."""
        if isinstance(task, SendFitTask):
            return self.fleet.plan_fit(
                task.client_id,
                round_number=task.round,
                start=now,
                deadline_at=deadline,
                num_examples=self.scenario.num_train_examples(task.client_id),
                epochs=task.config.epochs,
                model_bytes=self.model_bytes,
            )
        return self.fleet.plan_evaluate(
            task.client_id,
            round_number=task.round,
            start=now,
            num_examples=self.scenario.num_eval_examples(task.client_id),
            model_bytes=self.model_bytes,
        )

    def _compute(
        self,
        executor: Executor,
        phase: Phase,
        tasks: dict[str, SendFitTask | SendEvaluateTask],
        attempts: dict[str, Attempt],
        arrivals: Sequence[_Delivery],
        outcomes: dict[str, Outcome],
        delivery: _Delivery,
    ) -> None:
        """Train the results that will be needed next, as one parallel batch."""
        answered = sum(1 for outcome in outcomes.values() if outcome.error is None)
        still_needed = max(1, self.settings.target(phase) - answered)
        waiting = [
            d.client_id for d in arrivals if d.client_id not in outcomes and not d < delivery
        ]
        jobs = [self.job_for(tasks[client], attempts[client]) for client in waiting[:still_needed]]
        for outcome in executor.run(self.coordinator.parameters, jobs):
            outcomes[outcome.client_id] = outcome

    @staticmethod
    def job_for(task: SendFitTask | SendEvaluateTask, attempt: Attempt) -> Job:
        """The executor's job for ``task``, with the epochs the attempt could afford."""
        if isinstance(task, SendFitTask) and attempt.epochs != task.config.epochs:
            config: Any = dataclasses.replace(task.config, epochs=attempt.epochs)
            return Job(task.client_id, config)
        return Job(task.client_id, task.config)

    @staticmethod
    def _event(outcome: Outcome, round_number: int, at: float) -> Event:
        if outcome.error is not None:
            return ClientFailed(outcome.client_id, round_number, at, outcome.error)
        if outcome.update is not None:
            return UpdateReceived(
                outcome.client_id,
                round_number,
                at,
                outcome.update,
                outcome.num_examples,
                outcome.metrics,
            )
        return EvaluationReceived(
            outcome.client_id, round_number, at, outcome.loss, outcome.num_examples, outcome.metrics
        )

    # --- outputs ---------------------------------------------------------------------------

    def _row(
        self,
        summary: RoundSummary,
        *,
        attempts: dict[str, Attempt],
        uploads: int,
        commit: CommitVersion | None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        fit = summary.phase is Phase.FIT
        dropped = sum(1 for attempt in attempts.values() if attempt.dropped) + summary.failed
        row: dict[str, Any] = {
            "round": summary.round,
            "phase": summary.phase.value,
            "selected": summary.selected,
            "reported": summary.reported,
            "dropped": dropped,
            "stragglers": sum(
                1
                for a in attempts.values()
                if a.straggler and a.arrives_at is not None and a.arrives_at > summary.closed_at
            ),
            "partial": sum(
                1
                for a in attempts.values()
                if a.straggler and a.arrives_at is not None and a.arrives_at <= summary.closed_at
            ),
            "rejected": dict(summary.rejected),
            "committed": summary.committed,
            "abort_reason": summary.abort_reason,
            "num_examples": summary.num_examples,
            "loss": summary.loss,
            "accuracy": summary.metrics.get("accuracy"),
            "virtual_time_s": summary.closed_at,
            "model_version": None,
            "bytes_down": self.model_bytes * summary.selected,
            "bytes_up": uploads * (self.model_bytes if fit else _EVALUATION_UPLOAD_BYTES),
            **(extra or {}),
        }
        if fit and self.privacy is not None:
            row.update(self.privacy.row_fields(summary))
        if commit is None:
            head = self._head()
            row["model_version"] = None if head is None else head.version
            return row
        if self.config.evaluation.centralized:
            loss, accuracy = self.scenario.evaluate_centrally(commit.parameters)
            row.update(test_loss=loss, test_accuracy=accuracy, accuracy=accuracy)
        # the whole row goes with the version: a crash before metrics.jsonl is written loses nothing
        record = self._commit(commit.parameters, round_number=commit.round, metrics=row)
        row.update(model_version=record.version, sha256=record.sha256)
        return row

    def _emit(
        self,
        row: dict[str, Any],
        started: float,
        wall_offset: float,
        on_round: RoundCallback | None,
    ) -> dict[str, Any]:
        row["wall_time_s"] = round(wall_offset + time.perf_counter() - started, 6)
        self.metrics.append(row)
        if self._tracker is not None and row["phase"] == "fit":
            self._tracker.log_round(
                row["round"],
                loss=row.get("loss"),
                accuracy=row.get("accuracy"),
                epsilon=row.get("epsilon"),
                delta=row.get("delta"),
            )
        if on_round is not None:
            on_round(row)
        return row

    def _summary(self) -> dict[str, Any]:
        rows = self.metrics.rows()
        fits = [row for row in rows if row["phase"] == "fit"]
        committed = [row for row in fits if row["committed"]]
        last = committed[-1] if committed else {}
        evaluations = [row for row in rows if row["phase"] == "evaluate" and row["committed"]]
        final_accuracy = last.get("test_accuracy")
        if final_accuracy is None and evaluations:
            final_accuracy = evaluations[-1]["accuracy"]
        head = self._head()
        return {
            "rounds_completed": len(committed),
            "rounds_aborted": len(fits) - len(committed),
            "final_accuracy": final_accuracy,
            "final_loss": last.get("loss"),
            "final_test_loss": last.get("test_loss"),
            "final_federated_accuracy": evaluations[-1]["accuracy"] if evaluations else None,
            "wall_time_s": max((row["wall_time_s"] for row in rows), default=0.0),
            "virtual_time_s": rows[-1]["virtual_time_s"] if rows else 0.0,
            "num_parameters": len(self.coordinator.parameters),
            "bytes_up": sum(row["bytes_up"] for row in rows),
            "bytes_down": sum(row["bytes_down"] for row in rows),
            "model_version": None if head is None else head.version,
            "model_sha256": None if head is None else head.sha256,
            "strategy": self.config.strategy.name,
            "secure_aggregation": self.config.secure_aggregation.protocol,
            "rounds_aborted_below_threshold": sum(1 for row in fits if row.get("secure_aborted")),
            "clients_recovered": sum(row.get("recovered", 0) for row in fits),
            **({} if self.privacy is None else self.privacy.summary_fields()),
            **self._records.summary_fields(),
            "seed": self.config.run.seed,
            "clients": len(self.scenario.client_ids),
        }


def _closed(actions: Sequence[Action]) -> RoundSummary | None:
    return next((a.summary for a in actions if isinstance(a, RoundClosed)), None)


def load_run_config(run_dir: str | Path) -> Config:
    """The config a run folder was started with."""
    path = Path(run_dir) / _CONFIG_FILE
    if not path.exists():
        raise RunError(f"{run_dir} is not a Shoal run folder (no {_CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise RunError(f"{path} is corrupt: {exc}") from exc
    return parse_config(data)


def open_run_models(run_dir: str | Path) -> ModelRegistry:
    """The model registry of a run folder: ``shoal models list --state-dir RUN`` reads it too."""
    folder = Path(run_dir)
    database = registry_location(folder, None).open()
    # a simulation replays bit for bit: after a power cut, resume redoes what was lost
    return ModelRegistry(database, BlobStore(blob_location(folder, None), durable=False))


def final_parameters(run_dir: str | Path) -> Parameters:
    """The model at HEAD of a run folder."""
    if not (Path(run_dir) / _CONFIG_FILE).exists():
        raise RunError(f"{run_dir} is not a Shoal run folder (no {_CONFIG_FILE})")
    models = open_run_models(run_dir)
    try:
        head = models.head(MODEL_NAME)
        if head is None:
            raise RunError(f"{run_dir} holds no committed version")
        return models.load(MODEL_NAME, head.version)
    finally:
        models.database.close()
