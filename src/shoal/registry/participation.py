"""The participation log: who counted in each fit round, and how far its update lay from the rest.

One row per counted client per fit round, written in one statement when the
round closes, in the run's registry database: the participant (a per-round
pseudonym where the job asks for one: see :mod:`shoal.governance.pseudonyms`),
the version the round committed, and its divergence (L2 and cosine to the
aggregate and to the median, its z-score, whether it was flagged; NULL under
secure aggregation). The poisoned-model playbook, ``shoal rounds show`` and
unlearning read it back. A round replayed after a rollback writes new rows
beside the old branch's: each carries the version it led to.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from shoal.core.errors import RegistryError
from shoal.registry.clients import coarsen, require_aware, utc_now
from shoal.registry.database import Database
from shoal.registry.rows import insert_rows
from shoal.registry.schema import round_asked, round_participants

_IN_CHUNK = 500  # names per IN (...) list: within every backend's parameter limits


@dataclass(frozen=True, slots=True, kw_only=True)
class Participation:
    """One client's part in one fit round (divergence None: not measured)."""

    run_id: str
    round: int
    participant: str
    model_version: int | None = None
    l2_to_aggregate: float | None = None
    cosine_to_aggregate: float | None = None
    l2_to_median: float | None = None
    cosine_to_median: float | None = None
    z_score: float | None = None
    flagged: bool | None = None
    recorded_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.round < 1:
            raise RegistryError(f"fit rounds start at 1, got {self.round}")
        if not self.participant:
            raise RegistryError("a participant needs a name")


_MEASURES = (
    "l2_to_aggregate",
    "cosine_to_aggregate",
    "l2_to_median",
    "cosine_to_median",
    "z_score",
)


class ParticipationLog:
    """The rounds' participants kept in ``database`` (see the module docstring)."""

    def __init__(self, database: Database, *, granularity_s: int = 1) -> None:
        self.database = database
        self.granularity_s = granularity_s  # stored times are floored to it

    def record(self, entries: Sequence[Participation], *, now: datetime | None = None) -> int:
        """Keep ``entries`` (one statement); returns how many were written."""
        if not entries:
            return 0
        at = coarsen(require_aware(now or utc_now(), "now"), granularity_s=self.granularity_s)
        rows = [
            {
                "run_id": entry.run_id,
                "round": entry.round,
                "model_version": entry.model_version,
                "participant": entry.participant,
                **{name: _number(getattr(entry, name)) for name in _MEASURES},
                "flagged": entry.flagged,
                "recorded_at": entry.recorded_at or at,
            }
            for entry in entries
        ]
        with self.database.write() as connection:
            insert_rows(connection, round_participants, rows)
        return len(rows)

    def round(self, run_id: str, round_number: int) -> list[Participation]:
        """The participants of ``round_number``: of its latest play, if it was replayed."""
        table = round_participants
        with self.database.read() as connection:
            rows = connection.execute(
                sa.select(table)
                .where(table.c.run_id == run_id, table.c.round == round_number)
                .order_by(table.c.entry_id)
            ).all()
        entries = [_entry(row) for row in rows]
        if not entries:
            return []
        latest = entries[-1].model_version  # a replay's rows come after the old branch's
        return [entry for entry in entries if entry.model_version == latest]

    def find(self, run_id: str, participants: Collection[str]) -> list[Participation]:
        """Every row of ``run_id`` naming one of ``participants``, oldest first."""
        rows = self._naming(round_participants, run_id, participants, round_participants)
        found = [_entry(row) for row in rows]
        return sorted(found, key=lambda entry: (entry.round, entry.model_version or 0))

    def record_asked(
        self,
        run_id: str,
        round_number: int,
        *,
        phase: str,
        participants: Collection[str],
        now: datetime | None = None,
    ) -> int:
        """Keep who ``round_number`` asked and did not count (one statement; none: none)."""
        if not participants:
            return 0
        at = coarsen(require_aware(now or utc_now(), "now"), granularity_s=self.granularity_s)
        rows = [
            {
                "run_id": run_id,
                "round": round_number,
                "phase": phase,
                "participant": participant,
                "recorded_at": at,
            }
            for participant in sorted(participants)
        ]
        with self.database.write() as connection:
            insert_rows(connection, round_asked, rows)
        return len(rows)

    def asked(self, run_id: str, participants: Collection[str]) -> list[tuple[int, str]]:
        """(round, participant) of every round of ``run_id`` that asked one of
        ``participants`` and did not count it, on any branch, by round."""
        columns = (round_asked.c.round, round_asked.c.participant)
        rows = self._naming(round_asked, run_id, participants, *columns)
        return sorted((int(row.round), str(row.participant)) for row in rows)

    def asked_rounds(self, run_id: str) -> list[int]:
        """The rounds of ``run_id`` that asked a client they did not count, in order."""
        return self._rounds(round_asked, run_id)

    def rounds(self, run_id: str) -> list[int]:
        """The fit rounds of ``run_id`` with participants on record, in order."""
        return self._rounds(round_participants, run_id)

    def _rounds(self, table: sa.Table, run_id: str) -> list[int]:
        with self.database.read() as connection:
            rows = connection.execute(
                sa.select(table.c.round).where(table.c.run_id == run_id).distinct()
            ).all()
        return sorted(int(row.round) for row in rows)

    def _naming(
        self, table: sa.Table, run_id: str, participants: Collection[str], *columns: Any
    ) -> list[sa.Row[Any]]:
        """``columns`` of ``table``'s rows of ``run_id`` naming one of ``participants``, a
        statement per chunk of names."""
        names = sorted(set(participants))
        found: list[sa.Row[Any]] = []
        with self.database.read() as connection:
            for start in range(0, len(names), _IN_CHUNK):
                chunk = names[start : start + _IN_CHUNK]
                query = sa.select(*columns).where(
                    table.c.run_id == run_id, table.c.participant.in_(chunk)
                )
                found.extend(connection.execute(query))
        return found


def _number(value: float | None) -> float | None:
    """A measure as stored: NaN (never measured well) is NULL."""
    if value is None or math.isnan(value):
        return None
    return float(value)


def _entry(row: sa.Row[object]) -> Participation:
    mapping = row._mapping
    return Participation(
        run_id=str(mapping["run_id"]),
        round=int(mapping["round"]),
        participant=str(mapping["participant"]),
        model_version=mapping["model_version"],
        **{name: mapping[name] for name in _MEASURES},
        flagged=mapping["flagged"],
        recorded_at=mapping["recorded_at"],
    )
