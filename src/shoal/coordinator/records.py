"""A run's records on disk: the run folder and registries that both shells keep alike.

The run folder holds ``config.json``, ``metrics.jsonl`` and ``summary.json``
(the run-output contract of DESIGN.md), ``drift.jsonl`` (each fit round's
projection of its updates) and, at the run's end, ``report.html``
(``[report] enabled``), beside the model registry (each
committed round a version, with its row and optimizer state, signed by the
coordinator's key: :func:`run_signer`) and the client registry. With
``[tracking] mlflow = true`` every row also goes to one MLflow run, whose id
is kept in the folder so that a resumed run stays that one MLflow run: each
row's figures at ``step=round`` (:func:`tracked_metrics`), and at the end the
summary, the report and the final model (:meth:`RunRecords.end_tracking`).
A tracking store that fails in the middle of the run costs one warning and
the rest of its tracking (:meth:`RunRecords.track_row`), not the run.
:meth:`RunRecords.watch` hands every row, as it is stored, to an observer
(a coordinator's Prometheus metrics).

A run folder is held by one process while a run uses it: :meth:`RunRecords.open`,
as both shells open their run's records, holds the folder
(:func:`~shoal.core.folders.hold_folder`) before it reads or writes anything
there, and :meth:`RunRecords.close` lets it go last. A second process, resuming
the same run or serving the same state folder, is refused in one line: two
writers would commit rounds twice and rewrite ``metrics.jsonl`` under each other.
So is one whose registry (``registry_url``, shared) holds the same model for a
process with another state folder (:meth:`~shoal.registry.database.Database.hold`:
an advisory lock on PostgreSQL): its commits would interleave with the
first's on one HEAD.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shoal.config import Config, config_to_dict
from shoal.core.errors import NotFoundError, RunError, SecurityError
from shoal.core.files import write_whole
from shoal.core.folders import FolderHold, hold_folder
from shoal.core.parameters import Parameters
from shoal.governance.model_signing import (
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    ModelSigner,
    PinnedKey,
    load_or_create_signing_key,
    load_signing_key,
    public_pem,
    write_public_key,
)
from shoal.governance.pseudonyms import Pseudonyms
from shoal.preprocessing import STATISTICS_FILE
from shoal.registry import (
    AuditLog,
    ClientRegistry,
    ClientStatus,
    Database,
    HeadSigner,
    ModelRecord,
    ModelRegistry,
    ModelStatus,
    SignedHead,
    VersionSigner,
    holds_signed_head,
    verify_audit_log,
)
from shoal.registry.database import Held, lock_name
from shoal.registry.models import model_lock
from shoal.telemetry.metric_names import flatten_metrics
from shoal.telemetry.metrics import METRICS_FILE, SUMMARY_FILE, MetricsLog, clean_row
from shoal.telemetry.report import DRIFT_FILE, REPORT_FILE, load_run, write_report
from shoal.telemetry.tracking import MlflowTracker

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MLFLOW_RUN_FILE = "mlflow-run-id"
AUDIT_ANCHOR_FILE = "audit-anchor.json"
"""In a run folder: the last head of the registry's audit log that the run's key signed and that
committed, kept outside the registry (:meth:`RunRecords.vouch` checks the registry against it)."""
ANCHOR_EVERY_S = 60.0
"""How often a run keeps its latest signed head in :data:`AUDIT_ANCHOR_FILE`: at a process's
first commit, then at most this often, and when it closes the folder."""

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Committed:
    """A version the store committed (or will have committed before anyone reads it back)."""

    version: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Rollback:
    """A rollback of HEAD: from which version, to which, and why."""

    from_version: int | None
    to_version: int
    reason: str | None

    @classmethod
    def of(cls, details: Mapping[str, Any]) -> Rollback:
        """The rollback an audit entry's details describe."""
        return cls(details.get("from_version"), int(details["to_version"]), details.get("reason"))


class RunStore(Protocol):
    """The run's records, which the shell keeps: model versions, rows, summary, barred clients."""

    @property
    def database(self) -> Database: ...

    def head(self) -> ModelRecord | None: ...

    def versions(self) -> list[ModelRecord]: ...

    def load(self, record: ModelRecord) -> tuple[Parameters, bytes | None]: ...

    def commit(
        self,
        parameters: Parameters,
        *,
        round_number: int,
        metrics: Row,
        state: bytes,
        architecture: str,
        built_on: int | None = None,
        features: str | None = None,
        preprocessing: str | None = None,
    ) -> Committed:
        """Commit a version; ``built_on``: the version it was trained from, which must still
        be HEAD (:class:`~shoal.registry.models.HeadMoved` otherwise, nothing stored);
        ``features``: the sha256 of the feature module it was trained with, ``preprocessing``
        the sha256 of the scaler its tasks carried (each kept already)."""
        ...

    def keep(self, data: bytes) -> str:
        """Store ``data`` (the run's feature module, or its scaler) as a blob beside the
        versions; its sha256."""
        ...

    def check_anchor(self) -> None:
        """Refuse (a ``SecurityError``) a registry that did not grow from the audit head the run
        folder kept of it; first on a resume, before anything is read from it or written."""
        ...

    def vouch(self, record: ModelRecord) -> ModelRecord:
        """The HEAD a run resumes from, its signature checked (a ``SecurityError`` when it is
        not the run key's); an unsigned one signed where nothing else is."""
        ...

    def version(self, number: int) -> ModelRecord: ...

    def last_rollback(self) -> Rollback | None: ...

    def mark(self, number: int, status: ModelStatus, reason: str) -> ModelRecord: ...

    def rollback(self, number: int, reason: str) -> ModelRecord: ...

    def barred(self) -> set[str]: ...

    def suspend(self, client_id: str, reason: str) -> None: ...

    def pseudonyms(self, run_id: str) -> Pseudonyms: ...

    def audit_event(self, kind: str, *, subject: str, details: Mapping[str, Any]) -> None: ...

    def sign_audit_head(self) -> SignedHead | None: ...

    def transaction(self) -> AbstractContextManager[None]: ...

    def rows(self) -> list[Row]: ...

    def keep_rows(self, keep: Callable[[Row], bool]) -> list[Row]: ...

    def append_row(self, row: Row) -> None: ...

    def append_drift(self, line: str) -> None:
        """Append a round's drift record, one line of JSON, to ``drift.jsonl``."""
        ...

    def keep_drift(self, keep: Callable[[Row], bool]) -> list[Row]: ...

    def write_config(self, config: Mapping[str, Any]) -> None: ...

    def read_config(self) -> Mapping[str, Any] | None:
        """The config the run was last started with, as :meth:`write_config` wrote it (None:
        none was written)."""
        ...

    def write_summary(self, summary: Mapping[str, Any]) -> None: ...

    def write_statistics(self, text: str) -> None:
        """Write a statistics run's ``statistics.json`` (:mod:`shoal.preprocessing`)."""
        ...

    def write_report(self) -> None: ...


class RunRecords:
    """The :class:`~shoal.coordinator.run.RunStore` of a run folder and its registries."""

    def __init__(
        self,
        folder: str | Path,
        models: ModelRegistry,
        clients: ClientRegistry,
        *,
        model: str,
        signer: VersionSigner | None = None,
        head_signer: HeadSigner | None = None,
        pinned: PinnedKey | None = None,
        hold: FolderHold | None = None,
        held: Held | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.hold = hold  # this process's hold on the folder, let go by close()
        self.held = held  # and on the model in its registry
        self.folder.mkdir(parents=True, exist_ok=True)
        self.models = models
        self.signer = signer  # signs each version once, as it is committed
        self.head_signer = head_signer  # signs the audit log's head at each commit and the end
        self.pinned = pinned  # the signer's public key: what a resumed HEAD must verify with
        self.audit: AuditLog = models.audit
        self.clients = clients
        self.model = model
        self.metrics = MetricsLog(self.folder / METRICS_FILE)
        self.drift = MetricsLog(self.folder / DRIFT_FILE)  # one projection per fit round
        self.tracker: MlflowTracker | None = None
        self._watchers: list[Callable[[Row], None]] = []
        self._log_model = True  # [tracking] log_model, read when tracking starts
        self._suspended: dict[str, str] = {}  # simulated clients caught cheating
        self._signing: list[SignedHead] = []  # heads signed in the open transaction
        self._signed: SignedHead | None = None  # the latest head signed and committed
        self._anchored: SignedHead | None = None  # the one this process last kept in the folder
        self._tried_at: float | None = None  # when it last tried to (time.monotonic)

    @classmethod
    def open(
        cls,
        folder: str | Path,
        config: Config,
        *,
        what: str,
        registries: Callable[[], tuple[ModelRegistry, ClientRegistry]],
        model: str,
        run_id: str,
    ) -> RunRecords:
        """The records of the run in ``folder``, as both shells open them: the folder held by
        this process alone (else one :class:`~shoal.core.errors.RunError`, ``what`` naming
        it) before anything in it is read or written, then its signing key
        (:func:`run_signer`, signing for ``run_id``) and ``registries`` opened. :meth:`close`
        lets all of it go."""
        hold = hold_folder(folder, what=what)
        try:
            signer = run_signer(config, hold.folder, run_id=run_id)
            models, clients = registries()
        except BaseException:
            hold.release()
            raise
        try:  # a registry another state folder's coordinator runs this model in
            held = models.database.hold(f"model/{model}", what=f"model {model!r} of the registry")
        except BaseException:
            models.blobs.close()
            models.database.close()
            hold.release()
            raise
        return cls(
            hold.folder,
            models,
            clients,
            model=model,
            signer=signer,
            head_signer=signer.audit_head,
            pinned=PinnedKey.of(signer.private_key.public_key()),
            hold=hold,
            held=held,
        )

    def close(self) -> None:
        """The shell's last step with the run folder: close its logs and registries, then let
        the folder go to the next process (even when closing failed)."""
        try:
            self._anchor(force=True)  # a failed write is a warning: the rest closes anyway
            self.close_logs()
            self.models.blobs.close()
            if self.held is not None:
                self.held.release()
            self.database.close()
        finally:
            if self.hold is not None:
                self.hold.release()

    @property
    def database(self) -> Database:
        return self.models.database

    # --- model versions ----------------------------------------------------------------

    def head(self) -> ModelRecord | None:
        return self.models.head(self.model)

    def versions(self) -> list[ModelRecord]:
        """Every version of the run's model, on every branch, oldest first."""
        return self.models.list(self.model)

    def load(self, record: ModelRecord) -> tuple[Parameters, bytes | None]:
        parameters = self.models.load(self.model, record.version)
        return parameters, self.models.load_state(self.model, record.version)

    def commit(
        self,
        parameters: Parameters,
        *,
        round_number: int,
        metrics: Row,
        state: bytes,
        architecture: str,
        built_on: int | None = None,
        features: str | None = None,
        preprocessing: str | None = None,
    ) -> Committed:
        record = self.models.commit(
            self.model,
            parameters,
            round=round_number,
            architecture_version=architecture,
            metrics=clean_row(metrics),
            state=state,
            signer=self.signer,
            expected_head=built_on,
            features_sha256=features,
            preprocessing_sha256=preprocessing,
        )
        return Committed(record.version, record.sha256)

    def keep(self, data: bytes) -> str:
        return self.models.blobs.put(data)

    def vouch(self, record: ModelRecord) -> ModelRecord:
        """``record``, the HEAD a run resumes from, once its signature is this run's key's over
        the sha256 its blob was checked against (a ``SecurityError`` otherwise): a version
        changed in the registry, behind the coordinator's back, is never trained on, offered,
        or signed again. An unsigned version is signed here only where nothing in the registry
        is signed yet (one made by a Shoal before signing), or where the audit log, intact
        under this key's signed heads, recorded its commit unsigned with this very sha256 (a
        version from before signing, rolled back to). Without a signer, as it is."""
        pinned = self.pinned
        if self.signer is None or pinned is None:
            return record
        if record.signed is not None:
            try:
                pinned.verify(
                    record.signed,
                    name=record.name,
                    version=record.version,
                    round=record.round,
                    sha256=record.sha256,
                    features=record.features_sha256,
                    preprocessing=record.preprocessing_sha256,
                )
            except SecurityError as exc:
                if record.signed.key_id == pinned.key_id:
                    raise
                raise SecurityError(  # a legitimate key change, or not: say what would do
                    f"{exc}: the run's signing key is another than the one that signed HEAD "
                    "(coordinator.signing_key, the deployment's or the run folder's "
                    "model-signing.key): resume with that key"
                ) from None
            return record
        if self.models.holds_signatures() and not self._committed_unsigned(record):
            raise SecurityError(
                f"version {record.version} of {record.name!r}, HEAD, is not signed, in a registry "
                "whose versions are: it was changed outside Shoal (shoal audit verify, shoal "
                "models verify); roll back to a version that verifies (shoal models rollback)"
            )
        return self.models.sign(self.model, record.version, self.signer)

    def check_anchor(self) -> None:
        """Refuse a registry that did not grow from the head this run folder kept of it
        (:data:`AUDIT_ANCHOR_FILE`; :func:`~shoal.registry.holds_signed_head`): its signatures
        removed (a registry before signing looks so, and :meth:`vouch` would sign its HEAD as
        it stands), put back to an older copy, or its HEAD moved with no log entry to say so
        (every signature valid, but rounds, rollbacks and unlearning since undone). A run
        resumes only after it: a playbook's rollback, say, must not be written on such a
        registry first. A folder without the file (a Shoal before it), or a run without a
        signing key, is taken as it is."""
        pinned = self.pinned
        anchor = self._read_anchor()
        if anchor is None or self.signer is None or pinned is None:
            return
        path = self.folder / AUDIT_ANCHOR_FILE
        if anchor.key_id != pinned.key_id:
            raise SecurityError(
                f"{path} was signed by key {anchor.key_id}, not the run's signing key "
                f"{pinned.key_id} (coordinator.signing_key, the deployment's or the run "
                "folder's model-signing.key): resume with that key"
            )
        problem = holds_signed_head(self.database, anchor, pinned.verify_audit_head)
        if problem is not None:
            raise SecurityError(
                f"the registry is not the one this run left at audit entry {anchor.seq} "
                f"({problem}): it was changed outside Shoal (its signatures removed, its HEAD "
                f"moved, or put back to a copy older than this run folder's record of it, "
                f"{path}); if you restored the registry on purpose, remove that file and resume"
            )

    def _read_anchor(self) -> SignedHead | None:
        """The head kept in :data:`AUDIT_ANCHOR_FILE` (None: the folder holds none)."""
        path = self.folder / AUDIT_ANCHOR_FILE
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
            return SignedHead(
                seq=int(kept["seq"]),
                hash=str(kept["hash"]),
                key_id=str(kept["key_id"]),
                signature=bytes.fromhex(kept["signature"]),
                signed_at=int(kept["signed_at"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise SecurityError(
                f"cannot read {path} ({type(exc).__name__}: {exc}): the run folder's record of "
                "its registry's audit log; if you restored the registry on purpose, remove "
                "that file and resume"
            ) from None

    def _anchor(self, *, force: bool = False) -> None:
        """Keep the latest head signed and committed in :data:`AUDIT_ANCHOR_FILE`: a process's
        first, then every :data:`ANCHOR_EVERY_S` (``force``: now, as the folder is closed)."""
        head = self._signed
        if head is None or head == self._anchored:
            return
        now = time.monotonic()
        if not force and self._tried_at is not None and now - self._tried_at < ANCHOR_EVERY_S:
            return
        self._tried_at = now  # a write that fails is tried again a minute later, not each round
        kept = {
            "seq": head.seq,
            "hash": head.hash,
            "key_id": head.key_id,
            "signature": head.signature.hex(),
            "signed_at": head.signed_at,
        }
        text = json.dumps(kept, indent=2) + "\n"
        try:
            write_whole(self.folder / AUDIT_ANCHOR_FILE, lambda out: out.write(text.encode()))
        except OSError as exc:  # a weaker check at the next resume, not a lost round
            logger.warning(
                "could not keep the audit log's head %d in %s (%s): a resume checks the "
                "registry against the one kept before",
                head.seq,
                exc.filename or self.folder / AUDIT_ANCHOR_FILE,
                exc.strerror or exc,
            )
            return
        self._anchored = head

    def _committed_unsigned(self, record: ModelRecord) -> bool:
        """Whether the audit log, intact and held by this run's key, recorded ``record``'s
        commit unsigned (a Shoal before signing) with the sha256 the version holds."""
        assert self.pinned is not None
        if not verify_audit_log(self.database, self.pinned.verify_audit_head).intact:
            return False
        subject = f"{record.name}@v{record.version}"
        for entry in self.audit.entries(kind="commit"):
            if entry.subject == subject:  # its first commit entry: the version's own
                details = entry.details
                return details.get("signing_key_id") is None and details["sha256"] == record.sha256
        return False

    def version(self, number: int) -> ModelRecord:
        return self.models.get(self.model, number)

    def last_rollback(self) -> Rollback | None:
        """The model's latest rollback, as the audit log recorded it (None: never rolled back)."""
        for entry in reversed(self.audit.entries(kind="rollback")):
            name, _, _ = entry.subject.rpartition("@v")
            if name == self.model:
                return Rollback.of(entry.details)
        return None

    def mark(self, number: int, status: ModelStatus, reason: str) -> ModelRecord:
        return self.models.mark(self.model, number, status, reason=reason)

    def rollback(self, number: int, reason: str) -> ModelRecord:
        """Move HEAD back to version ``number`` (refused when it is BAD or its blob corrupt)."""
        return self.models.rollback(self.model, number, reason=reason)

    def barred(self) -> set[str]:
        return self.clients.barred() | set(self._suspended)

    def suspend(self, client_id: str, reason: str) -> None:
        """Suspend an enrolled client in the registry (an operator may resume it); a simulated
        client, never enrolled, is barred for the rest of this process."""
        try:
            self.clients.set_status(client_id, ClientStatus.SUSPENDED, reason[:500])
        except NotFoundError:
            self._suspended[client_id] = reason

    def pseudonyms(self, run_id: str) -> Pseudonyms:
        """The run's per-round pseudonyms, keyed by the folder's own ``pseudonym.key``."""
        return Pseudonyms.in_folder(self.folder, run_id=run_id)

    # --- the audit log -------------------------------------------------------------------

    def audit_event(self, kind: str, *, subject: str, details: Mapping[str, Any]) -> None:
        """Append an entry to the registry's audit log (as the models' registry's actor)."""
        self.audit.append(kind, subject=subject, details=details)

    def sign_audit_head(self) -> SignedHead | None:
        """Sign the audit log's head with the coordinator's key (None: no key, or no entry);
        once committed, the run folder keeps it (:data:`AUDIT_ANCHOR_FILE`)."""
        if self.head_signer is None:
            return None
        head = self.audit.sign_head(self.head_signer)
        # (a head another coordinator of a shared registry signed at this seq is not ours)
        if head is not None and self.pinned is not None and head.key_id == self.pinned.key_id:
            if self.database.writing():  # kept once the transaction commits
                self._signing.append(head)
            else:
                self._signed = head
                self._anchor()
        return head

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One registry transaction for what the block records (a round's version, its audit
        entries and head signature, its participants): all of it commits, or none. The model's
        lock is taken first, as a commit alone takes it, so the audit lock stays the last."""
        try:
            with self.database.write() as connection:
                lock_name(connection, model_lock(self.model))
                yield
        except BaseException:
            self._signing.clear()  # rolled back: no head of it is the registry's
            raise
        if self._signing and not self.database.writing():
            self._signed = self._signing[-1]
            self._signing.clear()
            self._anchor()

    # --- rows, config, summary ---------------------------------------------------------------

    def rows(self) -> list[Row]:
        return self.metrics.rows()

    def keep_rows(self, keep: Callable[[Row], bool]) -> list[Row]:
        return self.metrics.truncate(keep)

    def append_row(self, row: Row) -> None:
        self.metrics.append(row)
        self.track_row(row)
        for watcher in self._watchers:
            watcher(row)

    def watch(self, watcher: Callable[[Row], None]) -> None:
        """Hand ``watcher`` every row from now on, as it is stored (recovered rows too)."""
        self._watchers.append(watcher)

    def append_drift(self, line: str) -> None:
        self.drift.append_line(line)

    def close_logs(self) -> None:
        """Close the descriptors of the run's appends (``metrics.jsonl`` and ``drift.jsonl``):
        the shell's last step with the run folder."""
        self.metrics.close()
        self.drift.close()

    def keep_drift(self, keep: Callable[[Row], bool]) -> list[Row]:
        return self.drift.truncate(keep)

    def write_config(self, config: Mapping[str, Any]) -> None:
        text = (json.dumps(config, indent=2) + "\n").encode()
        write_whole(self.folder / CONFIG_FILE, lambda handle: handle.write(text))

    def read_config(self) -> Mapping[str, Any] | None:
        path = self.folder / CONFIG_FILE
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RunError(
                f"{path} cannot be read ({exc}): restore it, or remove it to take the job's "
                "config as the run's"
            ) from None
        if not isinstance(config, dict):
            raise RunError(f"{path} does not hold a config (a JSON object)")
        return config

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        text = json.dumps(clean_row(dict(summary)), indent=2, sort_keys=True)
        (self.folder / SUMMARY_FILE).write_text(text + "\n")

    def write_statistics(self, text: str) -> None:
        data = text.encode()
        write_whole(self.folder / STATISTICS_FILE, lambda handle: handle.write(data))

    def write_report(self) -> None:
        """Write the run folder's ``report.html``; a folder that refuses it costs a warning,
        not the run (its rows and summary are written already)."""
        try:
            write_report([load_run(self.folder)], self.folder / REPORT_FILE)
        except OSError as exc:
            logger.warning("the run's report was not written: %s", exc)

    # --- MLflow --------------------------------------------------------------------------

    def start_tracking(self, config: Config) -> None:
        """Open the run's MLflow run (the same one again on a resume) and log the config."""
        if not config.tracking.mlflow:
            return
        self._log_model = config.tracking.log_model
        saved = self.folder / MLFLOW_RUN_FILE
        resume = saved.read_text().strip() if saved.exists() else None
        self.tracker = MlflowTracker(
            run_name=config.run.name,
            folder=self.folder,
            tracking_uri=config.tracking.tracking_uri,
            experiment_name=config.tracking.experiment,
            resume_run_id=resume or None,
            timestamp_granularity_s=config.metadata.timestamp_granularity_s,
        )
        saved.write_text(self.tracker.run_id + "\n")
        self.tracker.log_params(config_to_dict(config), resumed=resume is not None)

    def track_row(self, row: Row) -> None:
        """Log a stored row to the MLflow run. A tracking store that fails mid-run costs one
        warning and the rest of the run's tracking, never the run: its records (rows, summary,
        registry) are the truth, and a resume reopens the MLflow run from the saved id."""
        if self.tracker is None:
            return
        try:
            self.tracker.log_round(row["round"], metrics=tracked_metrics(row))
        except RunError as exc:
            logger.warning(
                "MLflow tracking stops at round %d, the run goes on (its records are in %s): %s",
                row["round"],
                self.folder,
                exc,
            )
            self.tracker = None  # no request more: each would wait for the server again

    def end_tracking(self, *, finished: bool) -> None:
        """Close the run's MLflow run; a finished run first attaches ``summary.json``,
        ``report.html`` when the folder has one, and HEAD's parameters (unless
        ``[tracking] log_model = false``)."""
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            return
        try:
            if finished:
                self._log_outcome(tracker)
        except BaseException:
            tracker.end(status="FAILED")
            raise
        tracker.end(status="FINISHED" if finished else "FAILED")

    def _log_outcome(self, tracker: MlflowTracker) -> None:
        for name in (SUMMARY_FILE, REPORT_FILE):
            if (self.folder / name).is_file():
                tracker.log_artifact(self.folder / name)
        head = self.head()
        if self._log_model and head is not None:
            tracker.log_model(
                self.models.load(self.model, head.version),  # checked against its sha256
                name=self.model,
                version=head.version,
                details={
                    "round": str(head.round),
                    "architecture": head.architecture_version,
                    "status": head.status.value,
                },
            )


def run_signer(config: Config, folder: str | Path, *, run_id: str | None = None) -> ModelSigner:
    """What signs a run's versions, in both shells: the operator's key
    (``coordinator.signing_key``, else the deployment's ``model-signing.key``
    beside its certificates), or else the run folder's own, created (0600) on
    first start; versions are signed for ``run_id`` (the run's id as its records name it: a
    simulation's ``run.name``, a coordinator's ``coordinator.run_id``, the default). The key's
    public half is kept in the run folder as ``model-signing.pub``."""
    section = config.coordinator
    if section.signing_key is not None:
        key = load_signing_key(section.signing_key)
    elif (
        section.certificates is not None
        and (Path(section.certificates) / SIGNING_KEY_FILE).exists()
    ):
        key = load_signing_key(Path(section.certificates) / SIGNING_KEY_FILE)
    else:
        key = load_or_create_signing_key(Path(folder) / SIGNING_KEY_FILE)
    public = Path(folder) / PUBLIC_KEY_FILE  # what `shoal models verify` checks against
    if not public.exists() or public.read_bytes() != public_pem(key.public_key()):
        write_public_key(public, key.public_key())
    return ModelSigner(key, run_id=section.run_id if run_id is None else run_id)


_TRACKED_AS = {"epsilon": "privacy_epsilon", "delta": "privacy_delta"}
_NOT_METRICS = {"round", "model_version"}
EVALUATE_PREFIX = "evaluate_"


def tracked_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """Every figure of a row, nested ones flattened, as MLflow metrics
    (:func:`~shoal.telemetry.metric_names.flatten_metrics`); an evaluation row's
    names start with ``evaluate_``, so that they never overwrite a fit row's at a round."""
    prefix = "" if row.get("phase") == "fit" else EVALUATE_PREFIX
    figures = {
        _TRACKED_AS.get(name, name): value
        for name, value in row.items()
        if name not in _NOT_METRICS
    }
    return flatten_metrics(figures, prefix=prefix)
