"""The deterministic simulator: the coordinator driven by a discrete-event loop in virtual time.

Each round, the coordinator picks a cohort; the device fleet says when each
client's result would arrive (or that it never will); events are delivered
in virtual-time order until the round closes. Local training runs for real,
only for the results the coordinator will actually receive, batched over
the executor's workers. Nothing sleeps, and the same seed gives the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from shoal.config import Config, apply_overrides, config_to_dict, parse_config
from shoal.coordinator.app import resolve_apps
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.events import (
    Action,
    RoundClosed,
    RoundSummary,
    SendEvaluateTask,
    SendFitTask,
    StartRound,
)
from shoal.coordinator.records import CONFIG_FILE, RunRecords
from shoal.coordinator.run import EVALUATION_UPLOAD_BYTES, Ahead, Run, RunParts
from shoal.coordinator.schedule import Play
from shoal.coordinator.setup import (
    policy_from_config,
    round_settings_from_config,
    run_privacy,
    secure_settings_from_config,
    strategy_for,
)
from shoal.core.compression import EXTRAS_KEY as COMPRESSION_KEY
from shoal.core.errors import ConfigError, RunError
from shoal.core.files import write_whole
from shoal.core.folders import writable_folder
from shoal.core.parameters import Parameters, Vector
from shoal.registry import (
    AuditLog,
    BlobStore,
    ClientRegistry,
    ModelRegistry,
    blob_location,
    registry_location,
)
from shoal.simulation.attacks import AttackMetrics
from shoal.simulation.canaries import Canaries
from shoal.simulation.candidates import candidates, examined_size, members_needed
from shoal.simulation.consortium import Consortium
from shoal.simulation.device_states import simulated_state
from shoal.simulation.devices import Attempt, DeviceFleet
from shoal.simulation.dropouts import drop_time, dropped_in_wave, task_duration
from shoal.simulation.executor import Executor, Job, Outcome, make_executor
from shoal.simulation.plain_rounds import PlainRoundPlayer
from shoal.simulation.population import Population, client_index
from shoal.simulation.record_privacy import RecordLevelLedger
from shoal.simulation.secure_rounds import (
    SecureRoundPlayer,
    SimulatedIdentities,
    secure_row_fields,
)
from shoal.tasks import Phase

RoundCallback = Callable[[dict[str, Any]], None]
StartedRound = Callable[[Ahead | None], dict[str, Any]]
"""A round started (:meth:`Simulation.start_round`): called, it plays the rest and returns its
metrics row; its close calls the :data:`~shoal.coordinator.run.Ahead` given, if any."""

log = logging.getLogger("shoal.simulation")

MODEL_NAME = "global"
RESIDUALS_FILE = "residuals.npz"
"""What each simulated top-k client left out of its uploads, as of the run's last fit row."""
SIMULATOR = "simulator"  # the actor of the audit log's entries a simulation makes


class Simulation:
    """One simulated run in ``out``; ``resume=True`` continues the run found there.

    ``client_app`` and ``server_app`` are app objects that replace the ones
    the config's ``[app]`` section names; ``search_path`` holds the folders
    the named apps are imported from first (the config file's folder and
    the current directory, for the CLI).
    """

    def __init__(
        self,
        config: Config,
        out: str | Path,
        *,
        resume: bool = False,
        client_app: Any = None,
        server_app: Any = None,
        search_path: Sequence[str | Path] = (),
    ) -> None:
        self.config = config
        self.out = Path(out)
        self.resume = resume
        self.search_path = list(search_path)
        self.apps = resolve_apps(
            config, client=client_app, server=server_app, search_path=self.search_path
        )
        self.population = Population(
            self.apps.client, config, config.app.options, self.apps.features
        )
        self.canaries = Canaries.of_run(config, self.apps.server, self.population.clients)
        self.population.check_attacks()
        self.attack_metrics = self._attack_metrics()
        self.fleet = DeviceFleet(
            self.population.client_ids, config.devices, seed=config.run.seed, position=client_index
        )
        self.strategy = strategy_for(config, self.apps.server)
        self.settings = round_settings_from_config(
            config, population=len(self.population.client_ids)
        )
        self.consortium: Consortium | None = None
        if config.secure_aggregation.protocol == "ckks":
            writable_folder(self.out, what="run folder")
            self.consortium = Consortium(
                self.out, config.secure_aggregation, self.population.client_ids
            )
        self.privacy = run_privacy(config, self.settings, run_id=config.run.name)
        # the simulator plays both sides: it alone may give its clients seeded DP noise
        self.seeded_noise = config.privacy.enabled and not config.privacy.secure_noise
        self.secure = secure_settings_from_config(
            config,
            run_id=config.run.name,
            public_context=None if self.consortium is None else self.consortium.public_context,
            silo_keys=None if self.consortium is None else self.consortium.public_keys,
        )
        self.parts = RunParts(self.settings, self.strategy, self.secure, policy_from_config(config))
        self.parts.check(private=self.privacy is not None)
        self.identities = SimulatedIdentities(self.population.client_ids)  # SecAgg+'s PKI
        self._coordinator: Coordinator | None = None
        self.model_bytes = 0
        self.compression = config.compression.codec()  # of the plaintext fit rounds' uploads
        self.residuals: dict[str, Vector] = {}  # what each top-k client's last upload left out
        self.record_level = RecordLevelLedger()  # record-level DP-SGD, when clients run it
        self._enrolled_whole = False  # a large fleet enrolls each client when first selected
        self._clients: ClientRegistry | None = None
        self.lifecycle: Run | None = None

    @property
    def coordinator(self) -> Coordinator:
        """The round engine of the run (once it is open)."""
        if self._coordinator is None:
            raise RunError("the simulation has not started")
        return self._coordinator

    # --- public ---------------------------------------------------------------------------

    def run(self, *, on_round: RoundCallback | None = None) -> dict[str, Any]:
        """Play every remaining round; returns the summary also written to summary.json.
        ``on_round`` gets each round's row once it is recorded, when the next round may
        have started already (:class:`_Plays`)."""
        started = time.perf_counter()
        records = RunRecords.open(  # the folder is this process's until records.close()
            self.out,
            self.config,
            what="run folder",
            registries=lambda: run_registries(self.out),
            model=MODEL_NAME,
            run_id=self.config.run.name,
        )
        finished = False
        try:
            lifecycle = Run(
                self.config,
                app=self.apps.server,
                store=records,
                parts=self.parts,
                architecture=self.apps.architecture,
                privacy=self.privacy,
                resume=self.resume,
                where=str(self.out),
                features=self.apps.features,
                preprocessing=self.apps.preprocessing,
            )
            self.lifecycle = lifecycle  # a secure round reports its key holder's answers to it
            lifecycle.classify(self.fleet)  # the device classes of the fleet, for cohort fairness
            self._coordinator = lifecycle.open(self.population.first_client)
            self.model_bytes = lifecycle.model_bytes
            self._clients = records.clients
            self._enroll_fleet(lifecycle, records.clients, at=lifecycle.virtual_start)
            self._replay_drains(records.rows())
            self._load_residuals(records.rows())
            records.start_tracking(self.config)
            with self._executor() as executor:
                plays = _Plays(self, lifecycle, executor)
                for started_round in plays.rounds():
                    row = started_round(plays.ahead)
                    row["wall_time_s"] = round(
                        lifecycle.wall_offset + time.perf_counter() - started, 6
                    )
                    row.update(self.canaries.row_fields(self.coordinator.parameters, row))
                    lifecycle.record(row)
                    self._save_residuals(row)
                    if on_round is not None:
                        on_round(row)
                    plays.now = row["virtual_time_s"]
            attacked = self.attack_metrics
            summary = lifecycle.finish(
                {
                    **self.record_level.summary_fields(),
                    "clients": len(self.population.client_ids),
                    **self.canaries.summary_fields(self.coordinator.parameters, self.out),
                    **({} if attacked is None else attacked.summary_fields(records.rows())),
                }
            )
            finished = True
            return summary
        finally:
            try:
                records.end_tracking(finished=finished)  # may fail: the registry closes anyway
            finally:
                self.parts.release()
                records.close()

    def _attack_metrics(self) -> AttackMetrics | None:
        """What an attacked run measures (None: no ``[[attack]]``)."""
        if not self.config.attack:
            return None
        server = self.apps.server
        metrics = AttackMetrics(
            self.population.clients.attackers,
            test_data=server.test_data,
            probabilities=server.probabilities,
        )
        if metrics.backdoor is not None and not metrics.measures_backdoor:
            log.warning(
                "a backdoor attack's success rate needs the server app's test_data and "
                "probabilities (ServerApp fields); the rows leave it out"
            )
        return metrics

    def _enroll_fleet(self, lifecycle: Run, clients: ClientRegistry, *, at: float) -> None:
        """Enroll the simulated population; clients enrolled before keep their status.

        A fleet no larger than what a round examines is enrolled whole, up
        front; a larger one client by client, when a round first selects
        them (:meth:`enroll_cohort`): enrolling a million devices that
        mostly never train would cost more than the run.
        """
        if len(self.fleet) > examined_size(members_needed(lifecycle, Phase.FIT)):
            return
        self._enrolled_whole = True
        self._enroll(clients, self.population.client_ids, at=at)

    def enroll_cohort(self, names: Iterable[str], at: float) -> None:
        """Enroll the clients a round just asked, when the fleet is not enrolled whole."""
        if not self._enrolled_whole and self._clients is not None:
            self._enroll(self._clients, sorted(names), at=at)

    def _enroll(self, clients: ClientRegistry, names: Sequence[str], *, at: float) -> None:
        """Enroll ``names`` with what each reports at virtual time ``at``."""
        indices = np.fromiter((client_index(name) for name in names), np.int64, len(names))
        facts = self.fleet.facts(indices, at=at)
        clients.enroll_population(
            {name: simulated_state(facts, position) for position, name in enumerate(names)}
        )

    def _replay_drains(self, rows: Sequence[dict[str, Any]]) -> None:
        """The battery the run's recorded rounds drained: a resumed fleet is the same fleet."""
        for row in rows:
            drain = row.get("battery_drain") or {"at": 0.0, "devices": {}}
            for client, amount in drain["devices"].items():
                self.fleet.replay_drain(client, at=float(drain["at"]), amount=float(amount))

    def _save_residuals(self, row: dict[str, Any]) -> None:
        """Keep what each top-k client left out beside the run, after each fit round's row
        (its devices' memory): a resumed run goes on from it, as an uninterrupted one does."""
        if self.compression.kind != "topk" or row["phase"] != Phase.FIT.value:
            return
        arrays = {f"client:{client}": residual for client, residual in self.residuals.items()}
        arrays["round"] = np.array([row["round"]], dtype=np.int64)
        write_whole(
            self.out / RESIDUALS_FILE,
            lambda handle: np.savez(handle, allow_pickle=False, **arrays),
        )

    def _load_residuals(self, rows: Sequence[dict[str, Any]]) -> None:
        """The residuals saved with the run's last fit row, where a resumed top-k run has
        them; else every client starts at zero, as a restarted device does (warned)."""
        fits = [row["round"] for row in rows if row["phase"] == Phase.FIT.value]
        if self.compression.kind != "topk" or not fits:
            return
        path = self.out / RESIDUALS_FILE
        try:
            with np.load(path, allow_pickle=False) as saved:
                if int(saved["round"][0]) != fits[-1]:
                    raise ValueError(f"they are of round {int(saved['round'][0])}")
                self.residuals = {
                    name.removeprefix("client:"): saved[name].astype(np.float32)
                    for name in saved.files
                    if name.startswith("client:")
                }
        except (OSError, ValueError, KeyError, IndexError) as exc:
            log.warning(
                "%s: the top-k residuals of round %d are not there (%s): every client's "
                "starts at zero, and the run does not repeat an uninterrupted one",
                path,
                fits[-1],
                exc,
            )

    @contextmanager
    def _executor(self) -> Iterator[Executor]:
        settings = self.config.simulation
        executor = make_executor(
            self.canaries.clients(self.population.clients),
            workers=settings.workers,
            backend=settings.backend,
            ray_address=settings.ray_address,
            search_path=self.search_path,
        )
        try:
            yield executor
        finally:
            executor.close()

    # --- one round ------------------------------------------------------------------------

    def start_round(
        self,
        lifecycle: Run,
        executor: Executor,
        play: Play,
        candidates: tuple[str, ...],
        now: float,
        *,
        ahead: bool = False,
    ) -> StartedRound:
        """Start one round in virtual time: its cohort drawn, its first batch of training
        under way (``ahead``: while this process commits the round before). The round
        returned plays the rest and gives its metrics row (without wall time).

        Too few ``candidates`` are no reason to wait here: the engine aborts the round.
        """
        round_number, phase = play.round, play.phase
        config = lifecycle.round_config(play)
        self.coordinator.offload = executor.later  # the round's measures, in an idle worker
        actions = self.coordinator.handle(
            StartRound(round_number, phase, now, candidates, config, self.identities)
        )
        closed = _closed(actions)
        if closed is not None:
            fields = self.shell_fields(closed, {}, 0)
            return lambda _: lifecycle.close_round(closed, None, fields)
        if phase is Phase.FIT and self.coordinator.secure is not None:
            self.enroll_cohort(
                (a.client_id for a in actions if isinstance(a, SendFitTask | SendEvaluateTask)), now
            )
            return functools.partial(
                self._play_secure, lifecycle, executor, round_number, actions, now
            )
        player = PlainRoundPlayer(self, lifecycle, executor, round_number, phase)
        player.start(actions, now, ahead=ahead)
        return player.play

    def _play_secure(
        self,
        lifecycle: Run,
        executor: Executor,
        round_number: int,
        actions: list[Action],
        now: float,
        ahead: Ahead | None,
    ) -> dict[str, Any]:
        player = SecureRoundPlayer(self, executor, round_number)
        summary, commit = player.play(actions, now)
        traffic = player.traffic
        fields = {
            **self.shell_fields(
                summary,
                traffic.attempts,
                traffic.masked_inputs,
                traffic.reported_drops,
                model=None if commit is None else commit.parameters,
            ),
            **secure_row_fields(summary, traffic),
        }
        return lifecycle.close_round(summary, commit, fields, ahead=ahead)

    def plan_attempt(
        self, task: SendFitTask | SendEvaluateTask, now: float, deadline: float
    ) -> Attempt:
        """What the fleet says the client does with ``task``: when it answers, or that it drops.

        A dropout wave of the round (``[[devices.dropout_waves]]``) may take it first.
        """
        if dropped_in_wave(
            self.config.devices.dropout_waves,
            seed=self.config.run.seed,
            round_number=task.round,
            client_id=task.client_id,
        ):
            epochs = task.config.epochs if isinstance(task, SendFitTask) else 0.0
            return Attempt(task.client_id, None, epochs, dropped=True, straggler=False)
        if isinstance(task, SendFitTask):
            return self.fleet.plan_fit(
                task.client_id,
                round_number=task.round,
                start=now,
                deadline_at=deadline,
                num_examples=self.population.num_train_examples(task.client_id),
                epochs=task.config.epochs,
                model_bytes=self.model_bytes,
                upload_bytes=self.upload_bytes(task),
            )
        return self.fleet.plan_evaluate(
            task.client_id,
            round_number=task.round,
            start=now,
            num_examples=self.population.num_eval_examples(task.client_id),
            model_bytes=self.model_bytes,
        )

    def drop_at(self, task: SendFitTask | SendEvaluateTask, start: float, deadline: float) -> float:
        """When the coordinator learns that the device given ``task`` at ``start`` dropped."""
        client = task.client_id
        fit = isinstance(task, SendFitTask)
        duration = task_duration(
            self.fleet.device_class(client),
            num_examples=(
                self.population.num_train_examples(client)
                if fit
                else self.population.num_eval_examples(client)
            ),
            epochs=task.config.epochs if isinstance(task, SendFitTask) else 1 / 3,
            model_bytes=self.model_bytes,
            upload_bytes=self.upload_bytes(task) if fit else None,
        )
        return drop_time(
            seed=self.config.run.seed,
            round_number=task.round,
            client_id=client,
            start=start,
            deadline_at=deadline,
            duration=duration,
        )

    def job_for(self, task: SendFitTask | SendEvaluateTask, attempt: Attempt) -> Job:
        """The executor's job for ``task``, with the epochs the attempt could afford (and,
        for a top-k upload, what the client's last one left out)."""
        config: Any = task.config
        if isinstance(task, SendFitTask) and attempt.epochs != task.config.epochs:
            config = dataclasses.replace(task.config, epochs=attempt.epochs)
        residual = self.residuals.get(task.client_id) if isinstance(task, SendFitTask) else None
        return Job(task.client_id, config, seeded_noise=self.seeded_noise, residual=residual)

    def upload_bytes(self, task: SendFitTask | SendEvaluateTask) -> int | None:
        """The bytes of ``task``'s update on the device's uplink, where the task names a codec
        (None: the model's size)."""
        if not isinstance(task, SendFitTask) or COMPRESSION_KEY not in task.config.extras:
            return None
        return self.compression.payload_size(len(task.parameters))

    def keep_residual(self, outcome: Outcome) -> None:
        """A client's outcome is in: a top-k client keeps what its upload left out."""
        if outcome.residual is not None:
            self.residuals[outcome.client_id] = outcome.residual

    # --- what only the simulator knows of a round -------------------------------------------

    def shell_fields(
        self,
        summary: RoundSummary,
        attempts: dict[str, Attempt],
        uploads: int,
        reported_drops: int = 0,
        *,
        model: Parameters | None = None,
        uploaded_bytes: int | None = None,
    ) -> dict[str, Any]:
        """The row's fields that the device fleet decides: drops, stragglers, uploads, and the
        battery each device that trained drained (replayed when the run resumes); with
        ``[[attack]]``, a fit round's attackers and ``model``'s backdoor success rate.

        ``reported_drops``: the drops the coordinator was told of (counted in ``failed``);
        ``model``: the version the round commits (None: it commits none);
        ``uploaded_bytes``: what a fit round's uploads took (None: each the model's size).
        """
        fit = summary.phase is Phase.FIT
        fields = self._drained(summary, attempts) if fit else {}
        if fit and self.attack_metrics is not None:
            fields |= self.attack_metrics.fit_fields(
                summary.round, asked=attempts, counted=summary.participants, model=model
            )
        dropped = sum(1 for attempt in attempts.values() if attempt.dropped)
        return fields | {
            "dropped": dropped - reported_drops + summary.failed,
            "stragglers": sum(
                1
                for a in attempts.values()
                if a.straggler and a.arrives_at is not None and a.arrives_at > summary.closed_at
            ),
            "partial": sum(  # a dropped straggler may still count after an extension
                1
                for a in attempts.values()
                if a.straggler and a.arrives_at is not None and a.arrives_at <= summary.closed_at
            )
            if self.config.devices.straggler_policy == "partial"
            else 0,
            "bytes_up": uploaded_bytes
            if uploaded_bytes is not None
            else uploads * (self.model_bytes if fit else EVALUATION_UPLOAD_BYTES),
        }

    def _drained(self, summary: RoundSummary, attempts: dict[str, Attempt]) -> dict[str, Any]:
        if not self.config.devices.models_states:
            return {}
        at = summary.started_at
        drained = {
            client: self.fleet.drain(client, at=at, busy_s=attempt.busy_s)
            for client, attempt in sorted(attempts.items())
            if not attempt.dropped
        }
        return {
            "battery_drain": {
                "at": at,
                "devices": {client: amount for client, amount in drained.items() if amount > 0},
            }
        }


class _Plays:
    """The run's rounds, each started before it is played: the next one while the round
    before commits its version, where the run layer calls for that (:meth:`ahead`), else once
    the round before is recorded.

    An error of a start made ahead is raised once the round before is recorded: what that
    round committed stays committed.
    """

    def __init__(self, simulation: Simulation, lifecycle: Run, executor: Executor) -> None:
        self.simulation = simulation
        self.lifecycle = lifecycle
        self.executor = executor
        self.now = lifecycle.virtual_start  # when the last round closed, in virtual time
        self._schedule = lifecycle.plays()
        self._taken: Play | None = None  # taken from the schedule ahead, not started
        self._next: StartedRound | None = None  # started ahead
        self._failed: Exception | None = None  # the start made ahead failed
        self._stopped = False  # the privacy budget refused a round: training stops

    def rounds(self) -> Iterator[StartedRound]:
        """Each round of the run, started."""
        while True:
            if self._failed is not None:
                raise self._failed
            started, self._next = self._next, None
            if started is None and not self._stopped:
                play = self._take()
                started = None if play is None else self._start(play, at=self.now, ahead=False)
            if started is None:
                return
            yield started

    def ahead(self, row: dict[str, Any]) -> None:
        """Start the next round now (the run layer calls this while the round before,
        whose ``row`` this is, commits its version). A secure round gains nothing from it:
        it is taken from the schedule and started once the round before is recorded."""
        try:
            play = self._take()
            if play is None:
                return
            if play.phase is Phase.FIT and self.simulation.coordinator.secure is not None:
                self._taken = play
                return
            self._next = self._start(play, at=row["virtual_time_s"], ahead=True)
        except Exception as exc:  # raised after the round before is recorded
            self._failed = exc

    def _take(self) -> Play | None:
        play, self._taken = self._taken, None
        return next(self._schedule, None) if play is None else play

    def _start(self, play: Play, *, at: float, ahead: bool) -> StartedRound | None:
        self.simulation.model_bytes = self.lifecycle.model_bytes  # a split model weighs k more
        listed = candidates(self.lifecycle, self.simulation.fleet, play, at=at)
        admission = self.lifecycle.admit(play, listed, ahead=ahead)
        if admission.later:  # asked again once the round before is recorded
            self._taken = play
            return None
        if admission.stop is not None:
            self._stopped = True  # the privacy budget: training stops
            return None
        return self.simulation.start_round(
            self.lifecycle, self.executor, play, admission.candidates, at, ahead=ahead
        )


def _closed(actions: Sequence[Action]) -> RoundSummary | None:
    return next((a.summary for a in actions if isinstance(a, RoundClosed)), None)


def load_run_config(run_dir: str | Path) -> Config:
    """The config a run folder was started with."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise RunError(f"{run_dir} is not a Shoal run folder (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise RunError(f"{path} is corrupt: {exc}") from exc
    return parse_config(data)


def resumed_config(run_dir: str | Path, overrides: Iterable[str] = ()) -> Config:
    """The config a stopped run goes on with: its own, with at most ``run.rounds`` changed
    (``shoal simulate --resume`` and ``shoal.simulate(out=..., resume=True)`` alike)."""
    overrides = list(overrides)
    changed = [item for item in overrides if not item.startswith("run.rounds=")]
    if changed:
        raise ConfigError(f"a resumed run can only change run.rounds, not {', '.join(changed)}")
    data = config_to_dict(load_run_config(run_dir))
    return parse_config(apply_overrides(data, overrides))


def open_run_models(run_dir: str | Path) -> ModelRegistry:
    """The model registry of a run folder: ``shoal models list --state-dir RUN`` reads it too.

    What it changes is audited as done by the ``simulator``.
    """
    folder = Path(run_dir)
    database = registry_location(folder, None).open()
    audit = AuditLog(database, actor=SIMULATOR)
    # a simulation replays bit for bit: after a power cut, resume redoes what was lost
    return ModelRegistry(
        database, BlobStore(blob_location(folder, None), durable=False), audit=audit
    )


def run_registries(run_dir: str | Path) -> tuple[ModelRegistry, ClientRegistry]:
    """The model and client registries of a run folder, as a simulation keeps them."""
    models = open_run_models(run_dir)
    return models, ClientRegistry(models.database, audit=models.audit)


def final_parameters(run_dir: str | Path) -> Parameters:
    """The model at HEAD of a run folder."""
    if not (Path(run_dir) / CONFIG_FILE).exists():
        raise RunError(f"{run_dir} is not a Shoal run folder (no {CONFIG_FILE})")
    models = open_run_models(run_dir)
    try:
        head = models.head(MODEL_NAME)
        if head is None:
            raise RunError(f"{run_dir} holds no committed version")
        return models.load(MODEL_NAME, head.version)
    finally:
        models.database.close()
