"""The records a run keeps of each round: participants, audit entries, suspensions and alerts.

What a closed round leaves behind besides its metrics row: each fit
round's participants and their divergence in the registry's participation
log, under the round's pseudonyms (``[metadata]``); the audit log's entries
of who took part and of a key holder's decryptions; the suspension of the
clients a secure round caught cheating; and the job's alerts (``[alerts]``)
about a cohort that dropped past the job's share, with the fallback the
round took. :class:`RoundRecords` is built by the run layer
(:class:`~shoal.coordinator.run.Run`) with the run's store, id and config.
"""

from __future__ import annotations

import logging

from shoal.config import MetadataSection
from shoal.coordinator.events import ClusterSplit, RoundSummary
from shoal.coordinator.records import RunStore
from shoal.governance.pseudonyms import Names, PlainNames
from shoal.registry.participation import Participation, ParticipationLog
from shoal.tasks import Phase
from shoal.telemetry.alerts import AlertHook, CohortDropped, fire

log = logging.getLogger("shoal.run")


class RoundRecords:
    """A run's round records in its store; ``alerts``: the job's hooks, already resolved."""

    def __init__(
        self,
        store: RunStore,
        *,
        run_id: str,
        metadata: MetadataSection,
        alerts: list[AlertHook],
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.metadata = metadata
        self.alerts = alerts
        self._names: Names | None = None

    @property
    def names(self) -> Names:
        """How stored round records name clients: per-round pseudonyms (``[metadata]``), keyed
        by the run folder's own key, or their ids."""
        if self._names is None:
            self._names = (
                self.store.pseudonyms(self.run_id) if self.metadata.pseudonyms else PlainNames()
            )
        return self._names

    @property
    def participation(self) -> ParticipationLog:
        """Each fit round's participants and their divergence, in the run's database."""
        return ParticipationLog(
            self.store.database, granularity_s=self.metadata.timestamp_granularity_s
        )

    def record_participants(self, summary: RoundSummary, *, version: int | None) -> None:
        """Keep who counted in a fit round, under their round's pseudonyms, with divergence,
        and who any round asked and did not count."""
        counted = set(summary.participants) if summary.phase is Phase.FIT else set()
        asked = [client for client in summary.cohort if client not in counted]
        if asked:  # (unlearning replays a round that asked the client, counted or not)
            self.participation.record_asked(
                self.run_id,
                summary.round,
                phase=summary.phase.value,
                participants=[self.names.of(c, round_number=summary.round) for c in asked],
            )
        if summary.phase is not Phase.FIT or not summary.participants:
            return
        report = summary.divergence_report()
        measured = {} if report is None else {entry.client_id: entry for entry in report.clients}
        entries = []
        for client_id in summary.participants:
            divergence = measured.get(client_id)
            entries.append(
                Participation(
                    run_id=self.run_id,
                    round=summary.round,
                    participant=self.names.of(client_id, round_number=summary.round),
                    model_version=version,
                    **({} if divergence is None else divergence.fields()),
                )
            )
        self.participation.record(entries)

    def audit_selection(self, summary: RoundSummary) -> None:
        """The audit log's record of who took part in a round (before its commit's entry)."""
        details = {
            "run_id": self.run_id,
            "phase": summary.phase.value,
            "selected": summary.selected,
            # under the round's pseudonyms, as every stored round record (the key resolves them)
            "participants": sorted(
                self.names.of(client, round_number=summary.round) for client in summary.participants
            ),
            "committed": summary.committed,
            "abort_reason": summary.abort_reason,
        }
        self.store.audit_event("select", subject=f"round {summary.round}", details=details)

    def audit_split(self, split: ClusterSplit, *, version: int) -> None:
        """The audit log's record of a model split into cluster models (in the transaction
        of the version it made)."""
        details = {"run_id": self.run_id, "version": version, **split.row_field()}
        self.store.audit_event("clustered_split", subject=f"round {split.round}", details=details)

    def record_decryption(self, round_number: int, *, key_holder: str, error: str | None) -> None:
        """Audit the key holder's answer to a round's decryption request (the shell that
        asked reports it: ``key_holder`` names who decrypted, ``error`` a refusal)."""
        details = {"run_id": self.run_id, "key_holder": key_holder, "error": error}
        self.store.audit_event("decrypt", subject=f"round {round_number}", details=details)

    def suspend_culprits(self, summary: RoundSummary) -> None:
        """Clients a secure round caught cheating are suspended, with what they did."""
        report = summary.secure
        for client, what in ({} if report is None else report.culprits).items():
            reason = f"caught cheating in secure round {summary.round}: {what}"
            log.warning("suspending %s: %s", client, reason)
            self.store.suspend(client, reason)

    def cohort_dropped(self, summary: RoundSummary) -> None:
        """Tell the job's hooks that a round lost too much of its cohort, and what it did."""
        report = summary.fallback
        if report is None:
            return
        fire(
            self.alerts,
            CohortDropped(
                run_id=self.run_id,
                round=summary.round,
                phase=summary.phase.value,
                fallback=report.kind,
                configured=report.configured,
                dropped=report.dropped,
                cohort=report.cohort,
                replacements=report.replacements,
                extended_by_s=report.extended_by_s,
                committed=summary.committed,
                note=report.note,
            ),
        )
