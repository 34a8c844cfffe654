"""Unlearning, the registry's side: retire a client, find its first participation, roll HEAD back.

Forgetting a client starts from the participation log
(:mod:`shoal.registry.participation`): its rows name it under the run's
per-round pseudonyms, so the client's pseudonym is computed for every round
on record with the run's key and looked up. The rows whose version lies on
the current lineage (HEAD and its ancestors) say when it first counted,
round F. The version committed by the last round before F on that lineage
(version 0, the initial model, when F = 1) never saw its updates: HEAD moves
there, and the rounds from F on are trained again without the client
(barred, since it is RETIRED), on the same schedule: a simulation resumes at
once, a deployed coordinator when it next starts.

Nothing is deleted: the versions built on the client's updates (on any
branch) stay in the registry for audit, marked BAD with the reason, so that
no rollback returns to a model that holds what was to be forgotten.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from shoal.core.errors import ConfigError, NotFoundError, RegistryError
from shoal.governance.pseudonyms import PSEUDONYM_KEY_FILE, Names, PlainNames, Pseudonyms
from shoal.registry import ClientRegistry, ClientStatus, ModelRecord, ModelRegistry, ModelStatus
from shoal.registry.audit import AuditLog
from shoal.registry.clients import require_aware, utc_now
from shoal.registry.models import SUPERSEDED
from shoal.registry.participation import ParticipationLog

log = logging.getLogger("shoal.unlearning")

REPORT_PREFIX = "unlearning-"
PRIVACY_NOTE = (
    "what the old branch spent stays on the privacy ledger: its models were released, so the "
    "spend is never taken back; the recomputed rounds release new models under the same round "
    "numbers, so they are spent again on top (the ledger's next attempt), and their "
    "participants are charged again"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnlearningReport:
    """What unlearning a client did: where it first counted, what was rolled back and redone.

    ``recomputed_rounds`` lists the fit rounds trained again (empty until
    they are: a deployed coordinator retrains when it next starts);
    ``new_head_*`` describe HEAD after the retraining, or after the rollback
    when there was none yet.
    """

    client_id: str
    actor: str
    run_id: str
    model: str
    at: str
    participated_rounds: tuple[int, ...]
    first_participation: int | None
    first_asked: int | None  # the first round that asked it and did not count it
    restart_version: int | None
    restart_round: int | None
    old_head_version: int
    old_head_sha256: str
    old_head_accuracy: float | None
    superseded_versions: tuple[int, ...]
    recomputed_rounds: tuple[int, ...] = ()
    retrained: bool = False
    new_head_version: int | None = None
    new_head_sha256: str | None = None
    new_head_accuracy: float | None = None
    privacy_note: str | None = None
    next_step: str | None = None
    audit: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_recomputing(self) -> bool:
        """Whether HEAD went back before a round of the lineage that counted the client, or
        asked it (its draw was another without the client)."""
        return self.restart_version is not None

    def with_head(self, head: ModelRecord, *, recomputed: Iterable[int] = ()) -> UnlearningReport:
        """The report with HEAD as it is now (after retraining: ``recomputed`` its rounds)."""
        rounds = tuple(sorted(set(recomputed)))
        return replace(
            self,
            recomputed_rounds=rounds,
            retrained=bool(rounds),
            new_head_version=head.version,
            new_head_sha256=head.sha256,
            new_head_accuracy=central_accuracy(head),
        )

    def to_json(self) -> dict[str, Any]:
        """The report as JSON values (tuples as lists)."""
        return dict(json.loads(json.dumps(asdict(self))))

    def write(self, folder: str | Path) -> Path:
        """Write the report as ``unlearning-<client>.json`` in ``folder``; returns its path."""
        path = Path(folder) / f"{REPORT_PREFIX}{self.client_id}.json"
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path


def central_accuracy(record: ModelRecord) -> float | None:
    """The accuracy stored with a version (the server's central evaluation where there is one)."""
    metrics = record.metrics
    value = metrics.get("test_accuracy", metrics.get("accuracy"))
    return None if value is None else float(value)


def run_names(folder: str | Path, *, run_id: str, pseudonyms: bool) -> Names | None:
    """How the run's participation rows name clients: its pseudonyms, keyed by the folder's
    ``pseudonym.key``, or plain ids. None: the key is absent (never created here: a new key
    would resolve nothing)."""
    if not pseudonyms:
        return PlainNames()
    if not (Path(folder) / PSEUDONYM_KEY_FILE).exists():
        return None
    return Pseudonyms.in_folder(folder, run_id=run_id)


def lineage(records: Iterable[ModelRecord], head: ModelRecord) -> list[ModelRecord]:
    """HEAD and its ancestors, oldest first."""
    by_version = {record.version: record for record in records}
    chain = [head]
    while chain[-1].parent is not None:
        parent = by_version.get(chain[-1].parent)
        if parent is None or parent in chain:  # a registry never holds a cycle; be sure
            raise RegistryError(f"version {chain[-1].version} has a missing or cyclic parent")
        chain.append(parent)
    return chain[::-1]


def participated_versions(
    participation: ParticipationLog, names: Names | None, *, run_id: str, client_id: str
) -> dict[int, set[int | None]]:
    """The rounds on record in which ``client_id`` counted, each with the versions they led to
    (None: the round committed nothing)."""
    rounds = participation.rounds(run_id)
    if not rounds:
        return {}
    pseudonyms = _pseudonyms(names, client_id, rounds)
    found: dict[int, set[int | None]] = {}
    for entry in participation.find(run_id, pseudonyms):
        if entry.round in pseudonyms[entry.participant]:  # a pseudonym names its round only
            found.setdefault(entry.round, set()).add(entry.model_version)
    return found


def _pseudonyms(names: Names | None, client_id: str, rounds: Iterable[int]) -> dict[str, set[int]]:
    """``client_id``'s name in each of ``rounds``, with the rounds it names: one each for a
    per-round pseudonym, every round for the plain id (``[metadata] pseudonyms = false``)."""
    if names is None:
        raise ConfigError(
            f"the run's rounds are kept under pseudonyms, but {PSEUDONYM_KEY_FILE} "
            "is missing: the client's rounds cannot be found"
        )
    named: dict[str, set[int]] = {}
    for round_number in rounds:
        named.setdefault(names.of(client_id, round_number=round_number), set()).add(round_number)
    return named


def asked_rounds(
    participation: ParticipationLog, names: Names | None, *, run_id: str, client_id: str
) -> list[int]:
    """The rounds on record that asked ``client_id`` and did not count it, on any branch."""
    rounds = participation.asked_rounds(run_id)
    if not rounds:
        return []
    pseudonyms = _pseudonyms(names, client_id, rounds)
    return sorted(
        {
            round_number
            for round_number, participant in participation.asked(run_id, pseudonyms)
            if round_number in pseudonyms[participant]  # a pseudonym names its round only
        }
    )


def tainted_versions(records: Iterable[ModelRecord], seeds: Iterable[int]) -> set[int]:
    """The versions built on ``seeds`` (themselves included), on every branch."""
    children: dict[int, list[int]] = {}
    for record in records:
        if record.parent is not None:
            children.setdefault(record.parent, []).append(record.version)
    tainted: set[int] = set()
    frontier = list(seeds)
    while frontier:
        version = frontier.pop()
        if version not in tainted:
            tainted.add(version)
            frontier.extend(children.get(version, ()))
    return tainted


def forget(
    *,
    models: ModelRegistry,
    clients: ClientRegistry,
    participation: ParticipationLog,
    names: Names | None,
    model: str,
    run_id: str,
    client_id: str,
    actor: str,
    now: datetime | None = None,
) -> UnlearningReport:
    """Retire ``client_id``, roll HEAD back to before its first participation, mark what it
    built on BAD; the report says what to retrain. See the module docstring.

    Raises :class:`NotFoundError` for a client the registry does not hold,
    or a model without versions.
    """
    at = require_aware(now or utc_now(), "now")
    _require_enrolled(clients, client_id)  # everything is found before anything changes
    current = models.head(model)
    if current is None:
        raise NotFoundError(f"model {model!r} has no version: nothing to unlearn from")
    records = models.list(model)
    # unlearned before (the retraining interrupted, or done): the same report, from the HEAD
    # that first unlearning started from, and HEAD left where the retraining reached
    earlier = _first_unlearned_head(models, model=model, client_id=client_id)
    head = earlier or current
    chain = lineage(records, head)
    on_lineage = {record.version for record in chain}
    played = participated_versions(participation, names, run_id=run_id, client_id=client_id)
    rounds = sorted(r for r, versions in played.items() if versions & on_lineage)
    # a round that asked the client and did not count it drew differently with it (over-
    # selection, a drop, an evaluation): replayed too (on any branch up to HEAD: at worst a
    # round more is replayed, each the same without the client)
    asked = [
        r
        for r in asked_rounds(participation, names, run_id=run_id, client_id=client_id)
        if r <= head.round
    ]
    first = min([*rounds[:1], *asked[:1]], default=None)
    committed = {version for versions in played.values() for version in versions}
    superseded = tainted_versions(records, (v for v in committed if v is not None))
    report = UnlearningReport(
        client_id=client_id,
        actor=actor,
        run_id=run_id,
        model=model,
        at=at.isoformat(),
        participated_rounds=tuple(rounds),
        first_participation=rounds[0] if rounds else None,
        first_asked=asked[0] if asked else None,
        restart_version=None,
        restart_round=None,
        old_head_version=head.version,
        old_head_sha256=head.sha256,
        old_head_accuracy=central_accuracy(head),
        superseded_versions=tuple(sorted(superseded)),
    )
    target = None
    if first is not None:
        target = restart_point(chain, before_round=first, tainted=superseded)
        report = replace(report, restart_version=target.version, restart_round=target.round)
    retire(clients, client_id, actor=actor)
    again = earlier is not None and _retraining_from(records, current, target, superseded)
    # HEAD already at or before the restart (an operator rolled back further): left there
    before = target is not None and current in lineage(records, target)
    if target is not None and not again and not before:
        models.rollback(model, target.version, now=at)
    _mark_superseded(models, model, superseded, actor=actor, now=at)
    report = report.with_head(models.head(model) or current)
    return replace(report, audit=audit_unlearning(report, AuditLog(models.database)))


def _first_unlearned_head(
    models: ModelRegistry, *, model: str, client_id: str
) -> ModelRecord | None:
    """The HEAD the client's first unlearning of ``model`` started from (None: never
    unlearned), as the audit log recorded it."""
    for entry in models.audit.entries(kind="unlearn"):
        details = entry.details
        if entry.subject == client_id and details.get("model") == model:
            return models.get(model, int(details["old_head_version"]))
    return None


def _retraining_from(
    records: Iterable[ModelRecord],
    head: ModelRecord,
    target: ModelRecord | None,
    tainted: set[int],
) -> bool:
    """Whether ``head`` is ``target`` or was trained on from it without the client's updates:
    the retraining of an earlier unlearning, which goes on from there."""
    if target is None:
        return False
    chain = [record.version for record in lineage(records, head)]
    return target.version in chain and not set(chain[chain.index(target.version) :]) & tainted


def _require_enrolled(clients: ClientRegistry, client_id: str) -> None:
    if not clients.records([client_id]):
        raise NotFoundError(f"no client {client_id!r} in the registry")


def retire(clients: ClientRegistry, client_id: str, *, actor: str) -> None:
    """Retire the client for good (one already retired keeps its record and its reason)."""
    if clients.get(client_id).status is not ClientStatus.RETIRED:
        clients.set_status(client_id, ClientStatus.RETIRED, f"unlearned by {actor}")


def restart_point(chain: list[ModelRecord], *, before_round: int, tainted: set[int]) -> ModelRecord:
    """The newest version of the lineage committed before ``before_round``: not built on the
    client's updates, and not BAD (a BAD one is passed over for its ancestor)."""
    for record in reversed(chain):
        clean = record.version not in tainted and record.status is not ModelStatus.BAD
        if record.round < before_round and clean:
            return record
    raise RegistryError(
        f"no version before round {before_round} can be returned to (each one is BAD)"
    )


def _mark_superseded(
    models: ModelRegistry, model: str, versions: Iterable[int], *, actor: str, now: datetime
) -> None:
    """Mark BAD the versions built on the unlearned client's updates, for good (a BAD one's
    reason kept after it); the reason does not name the client: model rows are read more
    widely."""
    for version in sorted(versions):
        record = models.get(model, version)
        before = record.status_reason or ""
        if record.status is ModelStatus.BAD and before.startswith(SUPERSEDED):
            continue  # unlearned before: its verdict stays
        reason = f"{SUPERSEDED} ({actor}): built on an unlearned client's updates"
        if record.status is ModelStatus.BAD:  # (the playbook's, an operator's): kept beside it
            reason = f"{reason}; BAD before: {before}"
        models.mark(model, version, ModelStatus.BAD, reason=reason, now=now)


def audit_unlearning(report: UnlearningReport, audit: AuditLog) -> dict[str, Any]:
    """Append the unlearning to the audit log (kind ``unlearn``, by the report's actor, about
    the client); its facts are also logged and kept in the report."""
    facts: Mapping[str, Any] = {
        "kind": "unlearn",
        "actor": report.actor,
        "client_id": report.client_id,
        "run_id": report.run_id,
        "model": report.model,
        "first_participation": report.first_participation,
        "restart_version": report.restart_version,
        "old_head_version": report.old_head_version,
        "old_head_sha256": report.old_head_sha256,
        "superseded_versions": list(report.superseded_versions),
    }
    log.info("unlearning: %s", json.dumps(facts, sort_keys=True))
    audit.append("unlearn", subject=report.client_id, details=facts, actor=report.actor)
    return dict(facts)
