"""The run layer: a run's lifecycle above the round engine, one for the simulator and the server.

The round engine (:mod:`shoal.coordinator.engine`) plays one round; this
layer owns everything above it, so that each rule is written once:

- the first commit (the initial model as version 0) or the resume from
  HEAD (model, optimizer state, adaptive clip norm, the privacy ledger, told
  which rounds past HEAD were released on a branch HEAD left, so that their
  replays are spent again; a HEAD committed unsigned is signed, since
  clients refuse an unsigned model),
  with the metrics rows cut back to HEAD and a row lost in a crash rebuilt
  from its version;
- the schedule of fit and evaluation rounds, including an evaluation that
  was due before a crash;
- who may train in a round: the job's eligibility policy, ``[selection]``
  and the ``[[versions.require]]`` entries in force from their
  ``from_round`` on (:meth:`Run.version_requirements`), applied by the
  simulator to the devices it examined (:meth:`Run.screen`) and by the
  network coordinator as the registry's selection criteria
  (:meth:`Run.selection_criteria`); the row of each round counts the
  clients each criterion turned away (``excluded``);
- whether a round may start with the eligible clients a shell found
  (:meth:`Run.admit`): never the barred ones (suspended by an operator or
  for cheating in a secure round, or past their own privacy budget); under
  DP they are the population the round is sampled from and accounted for,
  and the privacy check before each fit round (a refusal ends training) is
  made with them;
- each round's config from the server app;
- the policy on every update (:mod:`shoal.coordinator.policy`): the engine
  asks it, with the facts of the run's registry, and its decisions are
  counted in the row and logged in the round's transaction (a sealed
  update's at once, mid-round);
- the metrics row of a closed round with its fleet telemetry (drops,
  stragglers, cohort fairness by the device classes the shell names with
  :meth:`Run.classify`, bandwidth; :mod:`shoal.coordinator.telemetry`) and the
  central evaluation (:mod:`shoal.coordinator.run_metrics`), and the version committed with
  that row before anyone is offered the new model; the drift projection
  of each fit round (``drift.jsonl``, cut back to HEAD on a resume). A shell whose clients
  are its own (the simulator's) may start the next round while the version commits
  (``ahead`` of :meth:`Run.close_round`): its cohort drawn, its training under way in the
  shell's processes; none of its results reaches the engine before the commit, and none
  ever does if the commit fails. Not when the playbook judges the version BAD (its
  rollback and suspensions change the next round);
- the round's records (:mod:`shoal.coordinator.round_records`): its
  participants and their divergence, the audit log's entries (who took
  part, a key holder's decryptions), the suspension of a secure round's
  cheats, and the job's alerts (``[alerts]``) about a cohort that dropped
  past the job's share; the audit log's head is signed at each commit and
  at the end;
- clustered FL that starts when the drift flags (``[clustering] start =
  "flagged"``): version 0 is one model, the engine's split rule
  (:mod:`shoal.coordinator.split`) splits it at a flagged round's commit,
  and that version is committed with its row's ``clustered_split`` and
  its audit entry; a resume or rollback finds one model or the clusters
  from the version's layout;
- the poisoned-model playbook (``[playbook]``,
  :mod:`shoal.coordinator.playbook`): each committed version judged, marked
  GOOD or BAD, HEAD rolled back and the suspects suspended;
- the end: the summary (:mod:`shoal.coordinator.run_metrics`).

It holds no clock and does no I/O of its own: the shell gives it a
:class:`RunStore` (the run folder and registries) and the times it
measured; the simulator and ``shoal coordinator serve`` only drive the
engine between the calls of a :class:`Run`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from shoal.aggregation.strategy import Strategy
from shoal.client.api import Client
from shoal.config import Config, config_to_dict, parse_config
from shoal.coordinator.app import Preprocessing, ServerApp, ServerContext, split_round_config
from shoal.coordinator.eligibility import DeviceFacts, EligibilityPolicy, Mask, requirements_of
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.events import CommitVersion, RoundSummary
from shoal.coordinator.fallback import candidates_wanted
from shoal.coordinator.playbook import (
    PLAYBOOK,
    RunPlaybook,
    recovered_row,
    resume_point,
    verdict_of,
)
from shoal.coordinator.policy import RunPolicy
from shoal.coordinator.records import RunStore
from shoal.coordinator.round_records import RoundRecords
from shoal.coordinator.rounds import RoundSettings
from shoal.coordinator.run_metrics import (
    EVALUATION_UPLOAD_BYTES as EVALUATION_UPLOAD_BYTES,  # re-exported: the shells import it here
)
from shoal.coordinator.run_metrics import (
    central_evaluation,
    divergence_rule,
    drift_projection,
    drift_rule,
    round_row,
    run_summary,
    why_aborted,
)
from shoal.coordinator.schedule import Play, evaluation_due, schedule
from shoal.coordinator.secure import SECAGG_PLUS, SecureSettings, check_secure_strategy
from shoal.coordinator.selection import PrivateSampler, cohort_size
from shoal.coordinator.split import SplitRule
from shoal.coordinator.telemetry import DeviceClasses, UnknownClasses
from shoal.core.clusters import perturbed_stack, split_models, stacked_clusters
from shoal.core.errors import ConfigError, ModelError, RunError, ShoalError
from shoal.core.parameters import Parameters
from shoal.core.transforms import state_from_bytes, state_to_bytes
from shoal.features import FeatureModule
from shoal.governance.policy import PolicyEngine
from shoal.governance.pseudonyms import Names
from shoal.governance.unlearning import lineage
from shoal.preprocessing import (
    AGGREGATE_TOLERANCE,
    BOUNDS_KEY,
    SCALER_KEY,
    STATISTICS_FILE,
    FeatureStatistics,
    MomentsCheck,
)
from shoal.preprocessing.scaler import sha256_text
from shoal.preprocessing.statistics import RESOLUTION
from shoal.privacy.coordinator import check_private_strategy
from shoal.privacy.run import RunPrivacy
from shoal.registry import (
    ModelRecord,
    ModelStatus,
    Requirement,
    SelectionCriteria,
    VersionMatrix,
)
from shoal.registry.models import SUPERSEDED, HeadMoved
from shoal.registry.participation import ParticipationLog
from shoal.tasks import Phase
from shoal.telemetry.alerts import AlertHook, alert_hooks

# What a restart cannot change (config keys, or the sections they start): the shape of the
# model, how updates combine and the server optimizer's state, the privacy accounting, the
# secure protocol and its keys, and the run id that clients sign. (The clusters' models are
# checked against HEAD's stack itself: _check_clusters.)
FIXED_FOR_THE_RUN = (
    "model.",
    "strategy.",
    "privacy.",
    "secure_aggregation.",
    "coordinator.run_id",
    "statistics.",
    "preprocessing.sha256",
)


def _first_round_off(
    rows: Iterable[Row], chain: Sequence[ModelRecord], *, until: int
) -> int | None:
    """The first round up to ``until`` that ``chain`` (HEAD's lineage) played again, its row
    naming a version off it: a branch HEAD left; None when there is none. (A round whose
    version the playbook rolled back, the run going on with the next round, is the lineage's
    history: the lineage has no version of that round.)"""
    on_chain = {record.version for record in chain}
    rounds_on_chain = {record.round for record in chain}
    return min(
        (
            row["round"]
            for row in rows
            if row["phase"] == "fit"
            and row.get("committed")
            and row["round"] <= until
            and row["round"] in rounds_on_chain
            and row.get("model_version") not in on_chain
        ),
        default=None,
    )


def _an_operators_bad(record: ModelRecord) -> bool:
    """Whether ``record`` is BAD by an operator's verdict (not the playbook's, nor
    unlearning's)."""
    reason = record.status_reason or ""
    return record.status is ModelStatus.BAD and not reason.startswith((PLAYBOOK, SUPERSEDED))


def check_same_app(head: ModelRecord, architecture: str, *, where: str) -> None:
    """Refuse to go on with a run whose HEAD another app made (ConfigError): its versions are
    that app's model, and this one would train on them or fail every round. Apps given to
    ``shoal.simulate`` as objects are not in the job, so a ``--resume`` from the command line
    resolved the job's own (the built-in) and trained it on the user's model."""
    if head.architecture_version == architecture:
        return
    raise ConfigError(
        f"{where} holds a run of the app {head.architecture_version!r}, not of this job's "
        f"{architecture!r}: go on with its own app (the [app] it was started with; apps given "
        "to shoal.simulate as objects: shoal.simulate(..., resume=True, client_app=..., "
        "server_app=...), or shoal.unlearn(..., client_app=...) with them)"
    )


def check_same_features(head: ModelRecord, features: FeatureModule | None, *, where: str) -> None:
    """Refuse to go on with a run whose HEAD was trained on another feature module's features
    (ConfigError): the model's inputs would silently change meaning (feature skew)."""
    sha256 = None if features is None else features.sha256
    if head.features_sha256 == sha256:
        return
    held = (
        "no feature module"
        if head.features_sha256 is None
        else f"the feature module {head.features_sha256[:16]}..."
    )
    wanted = "none" if features is None else f"{features.name} {features.version} ({sha256})"
    raise ConfigError(
        f"{where} holds a run trained with {held}, and this job's [features] module is "
        f"{wanted}: go on with the module the run was started with, or start a new run"
    )


def check_same_scaler(head: ModelRecord, sha256: str | None, *, where: str) -> None:
    """Refuse to go on with a run whose HEAD's tasks carried another scaler (ConfigError): the
    model's inputs would silently change scale."""
    if head.preprocessing_sha256 == sha256:
        return
    held, wanted = (
        "no scaler" if value is None else f"the scaler {value[:16]}..."
        for value in (head.preprocessing_sha256, sha256)
    )
    raise ConfigError(
        f"{where} holds a run whose tasks carried {held}, and this job's [preprocessing] gives "
        f"{wanted}: go on with the statistics the run was started with, or start a new run "
        "(if the job did not change, HEAD's row did: shoal models verify; a run started before "
        "Shoal signed scalers records none and cannot go on with one)"
    )


def config_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = ""
) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, before, after) for each value that differs, tables walked into (both
    whole dumps of a config, None values kept)."""
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            yield from config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            yield f"{prefix}{key}", old, new


def _listed(changes: list[tuple[str, Any, Any]]) -> str:
    def shown(value: Any) -> str:
        text = "unset" if value is None else json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{key} ({shown(old)}, now {shown(new)})" for key, old, new in changes)


log = logging.getLogger("shoal.run")

Row = dict[str, Any]
Ahead = Callable[[Row], object]
"""A shell's start of the next round, given the closing round's row (:meth:`Run.close_round`)."""
# how far apart the cluster models of version 0 start, in RMS values of the initial model (or
# absolute, for a zero model): enough for the clients' losses to tell them apart in round 1
CLUSTER_SPREAD = 0.1


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a round may start with the clients a shell found eligible, and with whom.

    ``wait``: too few to start (the live shell waits for more; the simulator
    plays the round, which the engine aborts); ``short``: with ``wait``, how many
    more eligible clients it needs (1 where any newcomer may change the answer);
    ``stop``: training stops; ``later``: asked ahead, while the round before commits, and
    only answered once it has (the privacy budget would refuse the round, and that refusal,
    which locks the data, must follow the round before's records).
    """

    candidates: tuple[str, ...]
    wait: str | None = None
    stop: str | None = None
    short: int = 1
    later: bool = False


@dataclass(frozen=True, slots=True)
class RunParts:
    """What the engine of a run is made of (the shell builds them from the config).

    ``policy``: the compiled ``[policy]`` (:func:`~shoal.coordinator.setup.policy_from_config`,
    built before anything opens so that a bad file is refused first); None: no policy.
    """

    settings: RoundSettings
    strategy: Strategy
    secure: SecureSettings | None = None
    policy: PolicyEngine | None = None

    def check(self, *, private: bool, secure: bool = False) -> None:
        """Refuse, before anything opens, a strategy that DP or secure aggregation cannot serve.

        ``secure``: the run aggregates securely (a shell that builds its
        :class:`SecureSettings` only once the folders are open says so here).
        """
        if private:
            check_private_strategy(self.strategy)
        if secure or self.secure is not None:
            check_secure_strategy(self.strategy)

    def release(self) -> None:
        """Free what the parts hold while rounds run (the policy's query thread)."""
        if self.policy is not None:
            self.policy.stop_querier()


class Run:
    """One run's lifecycle; see the module docstring.

    ``resume``: True continues the run in the store (refused when it holds
    none), False starts one (refused when it holds one), None does either
    (a coordinator restarted by its supervisor). ``run_id`` names the run in
    the registry's logs (default: ``run.name``).
    """

    def __init__(
        self,
        config: Config,
        *,
        app: ServerApp,
        store: RunStore,
        parts: RunParts,
        architecture: str,
        privacy: RunPrivacy | None = None,
        resume: bool | None = None,
        where: str = "the run folder",
        run_id: str | None = None,
        features: FeatureModule | None = None,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        if preprocessing is not None:  # the run keeps the sha256 of its statistics: a resume
            # with any others is refused (FIXED_FOR_THE_RUN), pinned or not
            pinned = config.preprocessing.model_copy(update={"sha256": preprocessing.sha256})
            config = config.model_copy(update={"preprocessing": pinned})
        self.config = config
        self.app = app
        self.store = store
        self.parts = parts
        self.architecture = architecture
        self.features = features  # recorded, signed, with every version it trains
        self.preprocessing = preprocessing  # its scaler sent with every task
        self._scaler_text = None if preprocessing is None else preprocessing.scaler.text()
        # what every version records and signs of it: hashed once, not at every commit
        self._scaler_sha256 = None if self._scaler_text is None else sha256_text(self._scaler_text)
        # a statistics run's bounds go with its tasks: each client clips and scales with the
        # coordinator's, whatever its own copy of the job says
        self._bounds_text = config.statistics.bounds().text() if config.statistics.enabled else None
        self.privacy = privacy
        self.resume = resume
        self.where = where
        self.run_id = config.run.name if run_id is None else run_id
        alerts = config.alerts  # resolved now: a hook's typo stops the run before it starts
        self.alerts: list[AlertHook] = alert_hooks(
            commands=alerts.commands, functions=alerts.hooks, timeout_s=alerts.timeout_s
        )
        self.first_round = 1
        self.current_round = 1  # the round the schedule reached (played, or waiting for clients)
        self.replay_evaluation = False  # an evaluation was due when the run stopped
        self.virtual_start = 0.0  # virtual time already spent (simulation)
        self.wall_offset = 0.0  # wall time already spent, by earlier processes
        self.stop_reason: str | None = None
        # why a finished run that played fit rounds committed none, in one line (both shells
        # exit 1 on it: an app whose every client fails, or a quorum no cohort meets, ended as
        # if it had trained), or why a statistics run wrote no statistics; None when a round
        # committed, none was played, or it goes on
        self.nothing_committed: str | None = None
        self.model_bytes = 0
        self.eligibility = EligibilityPolicy(  # the matrix as the run (re)starts: a simulation's
            config.selection,  # screening (a coordinator's registry selects with it itself)
            config.versions,
            model=architecture,
            matrix=VersionMatrix(store.database).requirements(architecture),
        )
        self._screened: Row | None = None  # the screened play's counts, until its row
        self._coordinator: Coordinator | None = None
        self._bars: list[Callable[[], Iterable[str]]] = []  # the shell's own sources of bars
        self.device_classes: DeviceClasses = UnknownClasses()  # the shell's, for fairness
        self.records = RoundRecords(
            store, run_id=self.run_id, metadata=config.metadata, alerts=self.alerts
        )
        self.playbook: RunPlaybook | None = None  # [playbook], once the run is open
        self._previous: Parameters | None = None  # the model the next commit steps from
        self._built_on: int | None = None  # its version: HEAD, unless moved outside the run
        # the weights (sha256: version) an operator marked BAD, when the run opened: a round
        # that makes them again is not committed (an operator's BAD HEAD, replayed after its
        # rollback). The playbook's own verdicts it reaches again itself, on the same figures;
        # unlearning's are of weights a replay without the client does not make.
        self._bad: dict[str, ModelRecord] = {}
        self._policy: RunPolicy | None = None  # the engine's, whose decisions the rounds write

    @property
    def features_sha256(self) -> str | None:
        """The sha256 of the run's feature module, which each version records (None: none)."""
        return None if self.features is None else self.features.sha256

    @property
    def preprocessing_sha256(self) -> str | None:
        """The sha256 of the scaler the run's tasks carry, which each version records and its
        signature covers (None: none)."""
        return self._scaler_sha256

    @property
    def names(self) -> Names:
        """How stored round records name clients: per-round pseudonyms (``[metadata]``), keyed
        by the run folder's own key, or their ids."""
        return self.records.names

    @property
    def participation(self) -> ParticipationLog:
        """Each fit round's participants and their divergence, in the run's database."""
        return self.records.participation

    @property
    def coordinator(self) -> Coordinator:
        if self._coordinator is None:
            raise RunError("the run is not open")
        return self._coordinator

    # --- start: first commit or resume ---------------------------------------------------

    def open(self, first_client: Callable[[], Client]) -> Coordinator:
        """The engine at HEAD; a new run commits its initial model as version 0 first.

        The initial model is the server app's, else the one the app's first
        client starts from (``first_client()``, built only when needed).
        """
        _ = self.names  # the pseudonym key first: one that others can read stops the run here
        head = self.store.head()
        if head is None and self.resume is True:
            raise RunError(f"{self.where} holds no committed version to resume from")
        if head is not None and self.resume is False:
            raise RunError(f"{self.where} already holds a run: resume it, or use another folder")
        if head is None:
            coordinator = self._start(self._initial_parameters(first_client))
        else:
            coordinator = self._restore(head)
        if self.privacy is not None:
            self.privacy.open(self.store.database)  # replays what the run spent before
        self.model_bytes = len(coordinator.parameters.to_bytes())
        self._coordinator = coordinator
        self._previous = coordinator.parameters
        opened = self.store.head()
        self._built_on = None if opened is None else opened.version
        self._open_playbook()
        return coordinator

    def _open_playbook(self) -> None:
        section = self.config.playbook
        head = self.store.head()
        if not section.enabled or head is None or self.config.statistics.enabled:
            return  # (a statistics run's one version is moments: nothing to judge or roll back)
        self.playbook = RunPlaybook(
            section,
            store=self.store,
            run_id=self.run_id,
            alerts=self.alerts,
            central=self.app.evaluate is not None,
            restore=self._roll_engine_back,
        )
        self.playbook.open(head, self.store.rows())

    def _roll_engine_back(self, record: ModelRecord) -> None:
        """The engine takes ``record``'s model and optimizer state: the next round trains
        from it (the playbook's rollback; to a version before a split, one model again)."""
        parameters, saved = self.store.load(record)
        template = self.parts.strategy.server_optimizer.init(parameters.vector)
        state = template if saved is None else state_from_bytes(template, saved)
        self.coordinator.restore(parameters, state)
        self._previous = parameters
        self._built_on = record.version
        self.model_bytes = len(parameters.to_bytes())

    @property
    def split_rule(self) -> SplitRule | None:
        """When the run's one model splits into cluster models (``[clustering] start =
        "flagged"``; None: it never does)."""
        clustering = self.config.clustering
        if clustering.start != "flagged" or clustering.clusters < 2:
            return None
        return SplitRule(max_clusters=clustering.clusters)

    def _initial_parameters(self, first_client: Callable[[], Client]) -> Parameters:
        """The model of version 0; under ``[clustering]``, that many cluster models stacked,
        each but the first moved by seeded noise so that clients' losses can tell them apart
        (``start = "flagged"``: one model, until the drift flags groups)."""
        model = self._initial_model(first_client)
        clusters = self.config.clustering.clusters
        if clusters == 1 or self.split_rule is not None:
            return model
        return perturbed_stack(
            model, clusters=clusters, seed=self.config.run.seed, scale=CLUSTER_SPREAD
        )

    def _initial_model(self, first_client: Callable[[], Client]) -> Parameters:
        make = self.app.initial_parameters
        where = "server app's initial_parameters" if make is not None else "first client"
        try:
            if make is not None:
                context = ServerContext(
                    config=self.config,
                    options=self.config.app.options,
                    features=self.features,
                    scaler=None if self.preprocessing is None else self.preprocessing.scaler,
                )
                made = make(context)
            else:
                made = first_client().get_parameters()
        except ShoalError:
            raise
        except Exception as exc:  # the user's code: one clear line, not a traceback
            raise RunError(
                f"the initial model could not be made (the {where} raised "
                f"{type(exc).__name__}: {exc})"
            ) from exc
        if isinstance(made, Parameters):
            return made
        if isinstance(made, list | tuple):  # arrays in the model's order, as a FitResult takes
            return Parameters.from_arrays(made)
        raise RunError(
            f"the {where} returned {type(made).__name__}: give a shoal Parameters, or a list "
            "of arrays in the model's order"
        )

    def _check_clusters(self, parameters: Parameters) -> None:
        """Refuse to resume a model stacked for another ``[clustering] clusters`` (under
        ``start = "flagged"``: one model, not split yet, or a stack of at most that many)."""
        clusters = self.config.clustering.clusters
        try:
            stacked = stacked_clusters(parameters)
            if self.split_rule is not None:
                if stacked is not None and not 2 <= stacked <= clusters:
                    raise ModelError(f"the model is a stack of {stacked} cluster models")
            elif clusters > 1:
                split_models(parameters, clusters=clusters)
            elif stacked is not None:
                raise ModelError("the model is a stack of cluster models")
        except ModelError as exc:
            raise RunError(
                f"{self.where} holds a model that does not match clustering.clusters = "
                f"{clusters}: {exc}"
            ) from exc

    def _engine(self, parameters: Parameters, state: Any = None) -> Coordinator:
        parts = self.parts
        policy = None
        if parts.policy is not None:
            policy = RunPolicy(
                parts.policy,
                database=self.store.database,
                run_id=self.run_id,
                architecture=self.architecture,
                versions=self.config.versions,
                privacy=self.privacy,
                names=self.names,
                granularity_s=self.config.metadata.timestamp_granularity_s,
            )
        self._policy = policy
        return Coordinator(
            settings=parts.settings,
            strategy=parts.strategy,
            parameters=parameters,
            seed=self.config.run.seed,
            optimizer_state=state,
            secure=parts.secure,
            privacy=None if self.privacy is None else self.privacy.coordinator,
            sampler=None if self.privacy is None else PrivateSampler.of(self.config, self.privacy),
            policy=policy,
            divergence=divergence_rule(self.config),
            drift=drift_rule(self.config),
            telemetry=self.config.telemetry.enabled,
            split=self.split_rule,
            metrics_aggregation={
                phase: aggregate
                for phase, aggregate in (
                    (Phase.FIT, self.app.fit_metrics),
                    (Phase.EVALUATE, self.app.evaluate_metrics),
                )
                if aggregate is not None
            },
        )

    def _start(self, initial: Parameters) -> Coordinator:
        if self.store.rows():
            raise RunError(f"{self.where} already holds a run: resume it, or use another folder")
        self.store.write_config(config_to_dict(self.config))
        if self.features is not None:  # kept where its versions are: a blob, by its sha256
            self.store.keep(self.features.wasm)
        if self._scaler_text is not None:  # the scaler too: what served models standardize with
            self.store.keep(self._scaler_text.encode())
        coordinator = self._engine(initial)
        with self.store.transaction():  # version 0 and a signed head over its entry, as a round's
            self.store.commit(
                initial,
                round_number=0,
                metrics={"virtual_time_s": 0.0},
                state=state_to_bytes(coordinator.optimizer_state),
                architecture=self.architecture,
                features=self.features_sha256,
                preprocessing=self.preprocessing_sha256,
            )
            self.store.sign_audit_head()
        return coordinator

    def _restore(self, head: ModelRecord) -> Coordinator:
        self.store.check_anchor()  # before anything is written on it (a playbook's rollback)
        check_same_app(head, self.architecture, where=self.where)
        check_same_features(head, self.features, where=self.where)
        check_same_scaler(head, self.preprocessing_sha256, where=self.where)
        self._check_job()
        reached, rolled_back_from = head.round, None
        if self.config.playbook.enabled:  # a BAD HEAD is rolled back; its round stays played
            head, reached, rolled_back_from = resume_point(self.store, head)
        parameters, saved = self.store.load(head)  # its blob checked against its sha256
        head = self.store.vouch(head)  # and that sha256 against the run key's signature
        self._check_clusters(parameters)
        template = self.parts.strategy.server_optimizer.init(parameters.vector)
        state = template if saved is None else state_from_bytes(template, saved)
        if self.privacy is not None:
            self.privacy.resume(head.metrics)
            # versions past HEAD were released on a branch HEAD left: replaying them spends again
            self.privacy.resume_at(head, self.store.versions())
        log.info("resuming from version %d (round %d)", head.version, head.round)
        # rows of a branch HEAD is not on (an operator rolled back to another branch) are
        # left out from the first round they played; HEAD's lineage gives its own rows back
        versions = self.store.versions()
        self._bad = {v.sha256: v for v in versions if _an_operators_bad(v)}
        chain = lineage(versions, head)
        diverged = _first_round_off(self.store.rows(), chain, until=head.round)
        kept = reached if diverged is None else diverged - 1
        rows = self.store.keep_rows(lambda row: row["round"] <= kept)
        self.store.keep_drift(lambda record: record["round"] <= kept)
        self.wall_offset = max((row.get("wall_time_s", 0.0) for row in rows), default=0.0)
        played = {row["round"] for row in rows if row["phase"] == "fit"}
        for record in chain:
            if record.round > 0 and record.round not in played:
                # (the crash came between committing HEAD and recording its row)
                recovered = self._recovered_row(record)
                self.store.append_row(recovered)
                rows.append(recovered)
        bad = rolled_back_from
        if bad is not None and not any(row.get("model_version") == bad.version for row in rows):
            self.store.append_row({**recovered_row(bad, head), "wall_time_s": self.wall_offset})
        self.first_round = self.current_round = reached + 1
        evaluated = any(r["round"] == reached and r["phase"] == "evaluate" for r in rows)
        # an evaluation due on HEAD that the stop came before is played first
        self.replay_evaluation = reached > 0 and self.evaluation_due(reached) and not evaluated
        self.virtual_start = max(  # virtual time goes on from the last round recorded
            [float(head.metrics.get("virtual_time_s", 0.0))]
            + [float(row.get("virtual_time_s") or 0.0) for row in rows]
            + ([] if bad is None else [float(bad.metrics.get("virtual_time_s") or 0.0)])
        )
        return self._engine(parameters, state)

    def _recovered_row(self, record: ModelRecord) -> Row:
        """The row of a version's round as the version keeps it (the whole row but its wall
        time, given the run's latest)."""
        recovered = {
            "round": record.round,
            "phase": "fit",  # (a version's metrics are its fit round's row)
            **record.metrics,
            "model_version": record.version,
            "sha256": record.sha256,
        }
        if self.config.playbook.enabled:
            recovered["playbook"] = verdict_of(record)
        return {**recovered, "wall_time_s": self.wall_offset}

    def _check_job(self) -> None:
        """Refuse a restart whose job changed what the run's records depend on (ConfigError,
        naming each key); take any other change, and keep it as the run's config."""
        stored = self.store.read_config()
        try:  # a key the stored config lacks (another Shoal's) is its default, as there
            before = None if stored is None else parse_config(stored).model_dump(mode="json")
        except ConfigError as exc:
            log.warning("the run's stored config is not one this Shoal reads (%s)", exc)
            before = None
        if before is None:  # none that can be compared: the job's becomes the run's
            self.store.write_config(config_to_dict(self.config))
            return
        changes = list(config_changes(before, self.config.model_dump(mode="json")))
        fixed = [change for change in changes if change[0].startswith(FIXED_FOR_THE_RUN)]
        if fixed:
            raise ConfigError(
                f"{self.where} holds a run started with another job: {_listed(fixed)}; a "
                "restart keeps what the run's versions, privacy ledger and secure rounds depend "
                "on: start a new run (another folder, or another run.name) to change them"
            )
        if changes:
            log.info("the job changed since the run last started: %s", _listed(changes))
            self.store.write_config(config_to_dict(self.config))

    # --- the schedule ----------------------------------------------------------------------

    def evaluation_due(self, round_number: int) -> bool:
        return evaluation_due(round_number, every=self.config.evaluation.every)

    def plays(self) -> Iterator[Play]:
        """The rounds still to play; training ends early when the privacy budget refuses one."""
        if self.replay_evaluation:
            self.current_round = self.first_round - 1
            yield Play(self.first_round - 1, Phase.EVALUATE)
        for play in schedule(
            first_round=self.first_round,
            rounds=self.config.run.rounds,
            evaluate_every=self.config.evaluation.every,
            stops_before=self._stops_before,
        ):
            self.current_round = play.round
            yield play

    # --- who may train -------------------------------------------------------------------

    def version_requirements(self, round_number: int) -> tuple[Requirement, ...]:
        """The job's ``[[versions.require]]`` entries in force in ``round_number``."""
        return requirements_of(self.config.versions, round_number)

    def selection_criteria(self, *, seen_within: timedelta | None = None) -> SelectionCriteria:
        """Who may train in the current round: the ``[selection]`` policy, the versioning
        matrix of the job's model, and the job's version requirements in force."""
        return SelectionCriteria.from_section(
            self.config.selection,
            model=self.architecture,
            seen_within=seen_within,
            requirements=self.version_requirements(self.current_round),
        )

    def excluded_criteria(self) -> tuple[str, ...]:
        """The keys of a row's ``excluded``: the policy's criteria, then ``versions``."""
        return (*self.config.selection.criteria(), "versions")

    def _stops_before(self, round_number: int) -> bool:
        """A stop a round decided, or a locked privacy budget, ends training before the shell
        looks for clients."""
        if self.stop_reason is not None:
            return True
        reason = None if self.privacy is None else self.privacy.locked()
        return reason is not None and self._stop(round_number, reason)

    def _stop(self, round_number: int, reason: str) -> bool:
        log.warning("training stops before round %d: %s", round_number, reason)
        self.stop_reason = reason
        return True

    def candidates_wanted(self) -> int:
        """How many eligible clients a shell that lists candidates should find for a fit
        round: the cohort, and as many again in reserve when the job re-selects after drops
        (never for a secure round, whose cohort is fixed once it starts)."""
        settings = self.parts.settings
        cohort = cohort_size(
            target=settings.clients_per_round, over_selection=settings.over_selection
        )
        return candidates_wanted(
            cohort=cohort,
            fallback=settings.fallback,
            secure=self.parts.secure is not None or self.config.secure_aggregation.enabled,
        )

    def bar(self, source: Callable[[], Iterable[str]]) -> None:
        """Also bar, at every selection, the clients ``source`` names then (for example,
        those a deployed coordinator refused attestation: only a shell can know them)."""
        self._bars.append(source)

    def classify(self, classes: DeviceClasses) -> None:
        """Name the population's device classes (only a shell knows them: the simulator's
        fleet, the registry's device facts), for the rows' cohort fairness."""
        self.device_classes = classes

    def barred(self) -> set[str]:
        """Clients never to select: suspended or retired, past their own privacy budget, or
        named by a source the shell added (:meth:`bar`)."""
        barred = self.store.barred()
        if self.privacy is not None:
            barred |= self.privacy.barred()
        for source in self._bars:
            barred.update(source())
        return barred

    def eligible(self, candidates: Iterable[str]) -> tuple[str, ...]:
        """``candidates`` without the barred clients, in order."""
        barred = self.barred()
        return tuple(client for client in candidates if client not in barred)

    def screen(self, play: Play, facts: DeviceFacts) -> Mask:
        """Which of the devices a shell examined for ``play`` meet the eligibility policy.

        The count each criterion excluded goes into the play's row as
        ``excluded``, and the number of devices screened as ``examined``
        (the last screening of the play counts: a shell that examines a
        wider sample screens again). A policy with no criterion records
        nothing and lets every device through.
        """
        screening = self.eligibility.screen(facts, round_number=play.round)
        if self.eligibility.active:
            self._screened = {"excluded": screening.excluded, "examined": len(facts)}
        return screening.eligible

    def admit(self, play: Play, listed: Iterable[str], *, ahead: bool = False) -> Admission:
        """Whether ``play`` may start with the clients the shell ``listed`` as eligible.

        Under DP they are a fit round's whole eligible population: its size
        sets the sampling rate the round is accounted at (and, in the first
        round, delta and the noise), so a round with fewer than the quorum
        waits rather than account a population it cannot establish.
        ``ahead``: asked while the round before commits (:meth:`close_round`); a round the
        privacy budget would refuse is answered ``later``, once it has.
        """
        candidates = self.eligible(listed)
        needed = self.parts.settings.quorum_count(play.phase)
        privacy = self.privacy if play.phase is Phase.FIT else None
        if len(candidates) < needed:
            if privacy is not None:
                privacy.saw_population(len(candidates))
            purpose = ", to establish the population privacy is accounted for" if privacy else ""
            wait = f"round {play.round} waits: {len(candidates)} eligible clients, {needed} needed"
            return Admission(candidates, wait=wait + purpose, short=needed - len(candidates))
        reason = None
        if privacy is not None:
            if ahead and privacy.refuses(population=len(candidates)):
                return Admission(candidates, later=True)
            reason = privacy.before_round(play.round, population=len(candidates))
        if reason is not None and self._stop(play.round, reason):
            return Admission(candidates, stop=reason)
        return Admission(candidates)

    def round_config(self, play: Play) -> dict[str, Any]:
        """The server app's config for this round (checked: a bad one stops the run clearly),
        with the run's scaler (``[preprocessing]``) or a statistics run's bounds, which are the
        run's, never the app's."""
        make = self.app.fit_config if play.phase is Phase.FIT else self.app.evaluate_config
        config: dict[str, Any] = {}
        try:
            if make is not None:
                config = dict(make(play.round))
                split_round_config(config)
        except ConfigError as exc:
            raise RunError(f"the server app's {play.phase.value} config: {exc}") from exc
        except Exception as exc:
            raise RunError(
                f"the server app's {play.phase.value} config failed in round {play.round}: {exc}"
            ) from exc
        for key, text in ((SCALER_KEY, self._scaler_text), (BOUNDS_KEY, self._bounds_text)):
            config.pop(key, None)
            if text is not None:
                config[key] = text
        return config

    # --- a closed round ------------------------------------------------------------------

    def close_round(
        self,
        summary: RoundSummary,
        commit: CommitVersion | None,
        extra: Mapping[str, Any],
        *,
        ahead: Ahead | None = None,
    ) -> Row:
        """The round's metrics row, its version committed with it; the shell records the row.

        ``extra`` holds what only the shell knows (wall time, the simulator's
        stragglers and bytes); it overrides the defaults. ``ahead``: the shell's start of
        the next round, called with the row once nothing left of this round can change
        what the next one does, before the version commits; only where the round commits a
        version that the playbook does not roll back (see the module's docstring). The
        shell feeds the engine nothing of that round before this returns.
        """
        row = round_row(
            summary,
            extra,
            names=self.names,
            model_bytes=self.model_bytes,
            excluded_criteria=self.excluded_criteria(),
            screened=self._screened,
            policy=self.parts.policy is not None,
            privacy=self.privacy,
            classes=self.device_classes,
        )
        self._screened = None  # the play's counts went into its row
        projection = drift_projection(summary, names=self.names)
        if projection is not None:
            self.store.append_drift(projection)
        records = self.records
        records.suspend_culprits(summary)
        records.cohort_dropped(summary)
        twin = (
            None if commit is None or not self._bad else self._bad.get(commit.parameters.sha256())
        )
        if twin is not None:  # never committed, nor trained on: training stops
            why = f"the weights of version {twin.version}, marked BAD ({twin.status_reason})"
            self._stop(
                summary.round + 1,
                f"round {summary.round} made {why}, again: suspend the clients behind it "
                "(shoal clients suspend) or change the job, then resume",
            )
            row.update(committed=False, abort_reason=f"made {why}, again")
            commit = None
        if commit is None:
            with self._round_transaction():
                records.audit_selection(summary)
                head = self.store.head()
                row["model_version"] = None if head is None else head.version
                records.record_participants(summary, version=None)
            judged = None if self.playbook is None else self.playbook.after_evaluation(row)
            if judged is not None:
                row["playbook"] = judged
            return row
        row.update(
            central_evaluation(
                self.app,
                commit.parameters,
                round_number=commit.round,
                clusters=stacked_clusters(commit.parameters) or 1,
            )
        )
        row["model_step_l2"] = self._step_l2(commit.parameters)
        if summary.split is not None:  # the stack weighs k times more from the next round on
            self.model_bytes = len(commit.parameters.to_bytes())
        verdict = None if self.playbook is None else self.playbook.judge_fit(row)
        if ahead is not None and (verdict is None or not verdict.rolls_back):
            ahead(row)
        # one transaction: the policy's decisions, the selection's entry, the version with the
        # whole row (a crash before the row is written loses nothing), its participants, and
        # the audit log's head signed over the commit's entry and all before it
        try:
            with self._round_transaction():
                records.audit_selection(summary)
                record = self.store.commit(
                    commit.parameters,
                    round_number=commit.round,
                    metrics=row,
                    state=state_to_bytes(self.coordinator.optimizer_state),
                    architecture=self.architecture,
                    built_on=self._built_on,
                    features=self.features_sha256,
                    preprocessing=self.preprocessing_sha256,
                )
                records.record_participants(summary, version=record.version)
                if summary.split is not None:
                    records.audit_split(summary.split, version=record.version)
                self.store.sign_audit_head()
        except HeadMoved as moved:  # an operator's rollback (or unlearning) while the run ran
            raise RunError(
                f"{self.where}: HEAD moved to version {moved.head} outside this run, which "
                f"trained round {commit.round} from version {moved.expected}: the round is not "
                "committed (its weights would carry what the rollback took out); restart the "
                f"run (--resume, or the coordinator) to go on from version {moved.head}"
            ) from None
        row.update(model_version=record.version, sha256=record.sha256)
        self._previous = commit.parameters
        self._built_on = record.version
        if self.playbook is not None and verdict is not None:  # after the records committed
            row["playbook"] = self.playbook.after_fit(
                summary, row, version=record.version, judged=verdict
            )
        return row

    @contextlib.contextmanager
    def _round_transaction(self) -> Iterator[None]:
        """The transaction of a closed round's records, the policy's decisions on its updates
        written first inside it (:mod:`shoal.coordinator.policy`)."""
        with self.store.transaction():
            if self._policy is not None:
                self._policy.write(self._policy.take_held())
            yield

    def _step_l2(self, parameters: Parameters) -> float | None:
        """The L2 norm of the step from the model the round started from to ``parameters``
        (the aggregate's behaviour, seen under secure aggregation too)."""
        previous = self._previous
        if previous is None or previous.layout != parameters.layout:
            return None
        return float(np.linalg.norm(parameters.vector - previous.vector))

    def record_decryption(self, round_number: int, *, key_holder: str, error: str | None) -> None:
        """Audit the key holder's answer to a round's decryption request (the shell that
        asked reports it: ``key_holder`` names who decrypted, ``error`` a refusal)."""
        self.records.record_decryption(round_number, key_holder=key_holder, error=error)

    def record(self, row: Row) -> None:
        """Keep a closed round's row (after the shell added its wall time)."""
        self.store.append_row(row)

    # --- the end ---------------------------------------------------------------------------

    def finish(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The run's summary (the run-output contract), written to the store, and then the
        run's report (``[report] enabled``)."""
        if self.config.statistics.enabled:
            extra = {**(extra or {}), "statistics": self._write_statistics()}
        summary = run_summary(
            self.store,
            config=self.config,
            architecture=self.architecture,
            num_parameters=len(self.coordinator.parameters),
            privacy=self.privacy,
            stop_reason=self.stop_reason,
            extra=extra,
        )
        if self.config.report.enabled:
            self.store.write_report()
        if summary["rounds_aborted"] and not summary["rounds_completed"]:
            self.nothing_committed = (
                f"no fit round committed, {summary['rounds_aborted']} aborted: "
                f"{why_aborted(self.store.rows())}; the model is the initial one"
            )
        return summary

    def _write_statistics(self) -> dict[str, Any] | None:
        """A statistics run's end: the statistics HEAD's moments give, written to the store
        (``statistics.json``); their summary, or None when no round committed any."""
        head = self.store.head()
        if head is None or head.round == 0:
            return None
        bounds = self.config.statistics.bounds()
        moments = self.coordinator.parameters.vector
        reported = head.metrics.get("reported")
        examples = head.metrics.get("num_examples")
        rounding = self._secure_rounding(head)
        problem = MomentsCheck(bounds.features, AGGREGATE_TOLERANCE + rounding)(moments)
        if problem is not None:  # past the secure sum's own rounding: a client's doing
            self.nothing_committed = (
                f"the cohort's averaged moments are ones no records give ({problem}), beyond "
                "what the secure sum rounds: a client sent moments outside its bounds under "
                "secure aggregation; no statistics written"
            )
            return None
        statistics = FeatureStatistics.from_moments(
            moments,
            bounds,
            examples=examples if isinstance(examples, int) else None,
            clients=reported if isinstance(reported, int) else None,
            resolution=max(RESOLUTION, 10 * rounding),
        )
        self.store.write_statistics(statistics.to_text())
        unresolved = statistics.unresolved
        if unresolved:
            log.warning(
                "features %s: a spread below what their bounds resolve (a variance under %g of "
                "the squared range): narrow their bounds, or they are constant",
                ", ".join(map(str, unresolved[:10])) + (" ..." if len(unresolved) > 10 else ""),
                statistics.resolution,
            )
        return {
            "file": STATISTICS_FILE,
            "features": statistics.features,
            "examples": statistics.examples,
            "clients": statistics.clients,
            "unresolved": len(unresolved),
            "model_version": head.version,
        }

    def _secure_rounding(self, head: ModelRecord) -> float:
        """How far a SecAgg+ sum's fixed point may move the averaged moments (a bound, not
        an estimate): each of the ``K`` contributors rounds its weighted value by at most one
        step, and the mean divides by the total weight; a mean square's error and twice the
        mean's add up to three times that. 0 in the clear, and under CKKS (float64)."""
        secure, metrics = self.parts.secure, head.metrics
        if secure is None or secure.protocol != SECAGG_PLUS:
            return 0.0
        counts = [metrics.get(key) for key in ("selected", "reported", "num_examples")]
        given = [count for count in counts if isinstance(count, int) and count > 0]
        if len(given) != len(counts):
            return 0.0
        selected, reported, examples = given
        quantization = secure.quantization_for(selected)
        total_weight = examples / quantization.max_weight  # no honest client is capped
        return 3 * reported * quantization.step() / total_weight
