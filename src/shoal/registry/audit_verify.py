"""Checking the audit log: every hash, the sequence, the links, and every signed head.

:func:`verify_audit_log` reads the whole log and names the **first** bad
entry and what is wrong with it:

- ``edited``: an entry's stored bytes do not hash to its stored hash (any
  column changed, its details no longer canonical JSON, or its seq changed);
- ``deleted``: a seq is missing, or the entries after it were renumbered;
- ``inserted``: an entry sits between two that link to each other;
- ``reordered``: an entry links to one that is not its predecessor;
- ``rewritten``: an entry and its hash were rewritten together (the next
  entry, or a signed head, no longer matches it);
- ``bad_signature``: a head signature is not the coordinator's over
  ``(seq, hash)``;
- ``unsigned``: a model commit that no signed head covers (the run layer
  signs the head right after every commit: its heads were deleted);
- ``contradicted``: the model registry disagrees with the entries the log
  holds of it: a version's round, parent, sha256, metrics or status is not
  what its commit and marks recorded, a version is gone, a version has no
  commit entry, or HEAD is not where the last commit or rollback moved it.

A hash chain alone proves nothing against someone who can rewrite the
whole table: the signed heads do. Entries after the last signed head are
covered by no signature (the report counts them): they can be dropped, or
the log's tail rewritten, without detection.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from shoal.core.errors import RegistryError, ShoalError
from shoal.registry.audit import (
    GENESIS_HASH,
    SignedHead,
    canonical_json,
    entry_hash,
    head_from_row,
    metrics_digest,
)
from shoal.registry.database import Database
from shoal.registry.schema import audit_heads, audit_log, model_heads, model_versions

HeadVerifier = Callable[[SignedHead], None]
"""Raises (a :class:`~shoal.core.errors.ShoalError`) unless a head's signature is the
coordinator's over its ``(seq, hash)``."""


@dataclass(frozen=True, slots=True)
class AuditProblem:
    """The first bad entry: its seq, what is wrong (see the module docstring), the detail."""

    seq: int
    kind: str
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditReport:
    """What :func:`verify_audit_log` found."""

    entries: int
    signed_seq: int | None  # the last head whose signature verified
    problem: AuditProblem | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None

    @property
    def uncovered(self) -> int:
        """Entries after the last signed head, which no signature covers."""
        return self.entries - (self.signed_seq or 0)

    def line(self) -> str:
        """One line for an operator."""
        if self.problem is not None:
            problem = self.problem
            return f"audit log TAMPERED: entry {problem.seq} {problem.kind}: {problem.detail}"
        signed = (
            "no head signed" if self.signed_seq is None else f"head signed at seq {self.signed_seq}"
        )
        tail = f"; {self.uncovered} later entries covered by no signature" if self.uncovered else ""
        return f"audit log intact: {self.entries} entries, {signed}{tail}"


@dataclass(frozen=True, slots=True)
class _Stored:
    """An entry's columns as stored, and whether they hash to the stored hash."""

    seq: int
    hash: str
    prev_hash: str
    fields: dict[str, Any] | None  # None: the details are not canonical JSON

    def hashes_to(self, *, seq: int) -> bool:
        return self.fields is not None and entry_hash(**(self.fields | {"seq": seq})) == self.hash

    @property
    def intact(self) -> bool:
        return self.hashes_to(seq=self.seq)


def _stored(row: sa.Row[Any]) -> _Stored:
    fields: dict[str, Any] | None
    try:
        details = json.loads(row.details)
        if canonical_json(details) != row.details:
            raise ValueError("not canonical")
        fields = {
            "seq": int(row.seq),
            "recorded_at": int(row.recorded_at),
            "kind": str(row.kind),
            "actor": str(row.actor),
            "subject": str(row.subject),
            "details": details,
            "prev_hash": str(row.prev_hash),
        }
    except (TypeError, ValueError):
        fields = None
    return _Stored(int(row.seq), str(row.hash), str(row.prev_hash), fields)


def verify_audit_log(database: Database, verifier: HeadVerifier) -> AuditReport:
    """Check the log in ``database`` and its heads against ``verifier`` (see the module
    docstring); never raises on tampering, which the report names."""
    with database.read(snapshot=True) as connection:  # a coordinator may commit meanwhile
        try:
            rows = [
                _stored(row)
                for row in connection.execute(sa.select(audit_log).order_by(audit_log.c.seq))
            ]
            heads = [
                head_from_row(row)
                for row in connection.execute(sa.select(audit_heads).order_by(audit_heads.c.seq))
            ]
        except (TypeError, ValueError) as exc:  # a seq or a time no longer a number
            raise RegistryError(f"the audit log cannot be read (tampered?): {exc}") from exc
        registry = _registry(connection)  # in the log's transaction: a commit meanwhile is not
    problems = [p for p in (check_chain(rows),) if p is not None]
    signed_seq, head_problem = _check_heads(rows, heads, verifier)
    if head_problem is None:
        head_problem = _unsigned_commit(rows, signed_seq)
    if head_problem is not None:
        problems.append(head_problem)
    first = min(problems, key=lambda problem: problem.seq) if problems else None
    if first is None:  # the entries are the log's own: the registry must agree with them
        first = _contradicted(rows, *registry)
    return AuditReport(entries=len(rows), signed_seq=signed_seq, problem=first)


def holds_signed_head(database: Database, head: SignedHead, verifier: HeadVerifier) -> str | None:
    """Why the registry in ``database`` did not grow from ``head`` (a head signed over its
    entry, kept outside the registry), or None where it did: its whole log links from the first
    entry on, each entry untouched; the entry at ``head``'s seq is still of its hash, under a
    head signed there over that hash that ``verifier`` accepts; and the model registry agrees
    with the log (each version as its commit recorded it, each HEAD where the last commit or
    rollback moved it).

    A writer of the registry without the signing key can neither keep such a head while
    changing the entries it covers, nor make one: a log stripped of its signatures, put back to
    a copy older than ``head`` (with the anchored rows copied in or not), or a HEAD moved with
    no entry to say so does not pass. Entries after ``head`` are covered by no signature: a
    writer who appends a rollback entry of its own (as ``shoal models rollback`` does, with no
    key) and moves HEAD with it is not told. Only the head at ``head``'s seq is verified: a
    registry that several coordinators share holds heads that other keys signed.

    The log is read as a stream, keeping only the entries about models (about 27 us an entry
    on a 2-core machine: a million, half a minute)."""
    with database.read(snapshot=True) as connection:  # a coordinator may commit meanwhile
        try:
            signed = connection.execute(
                sa.select(audit_heads).where(audit_heads.c.seq == head.seq)
            ).first()
            kept = None if signed is None else head_from_row(signed)
            stream = connection.execution_options(yield_per=_STREAM_ROWS).execute(
                sa.select(audit_log).order_by(audit_log.c.seq)
            )
            models, entries, anchored, broken = _model_entries(stream, at=head.seq)
        except (TypeError, ValueError) as exc:  # a seq or a time no longer a number
            raise RegistryError(f"the audit log cannot be read (tampered?): {exc}") from exc
        registry = _registry(connection)
    if broken is not None:
        return broken
    if anchored is None:
        return f"it holds no entry {head.seq}"
    if anchored != head.hash:
        return f"its entry {head.seq} is another than the one signed"
    if kept is None:
        return f"no head is signed at its entry {head.seq}"
    if kept.hash != head.hash:
        return f"the head signed at its entry {head.seq} is over another hash"
    try:
        verifier(kept)
    except ShoalError as exc:
        return str(exc)
    contradicted = _contradicted(models, *registry, entries=entries)
    if contradicted is not None:
        return f"its entry {contradicted.seq} is contradicted: {contradicted.detail}"
    return None


_STREAM_ROWS = 1_000


def _model_entries(
    rows: Iterable[sa.Row[Any]], *, at: int
) -> tuple[list[_Stored], int, str | None, str | None]:
    """The entries about models among ``rows`` (the whole log, in seq order), how many entries
    there are, the hash of the one at seq ``at``, and the first break of the chain (None: it
    links from the first entry on, each entry untouched)."""
    models: list[_Stored] = []
    previous, count, anchored = GENESIS_HASH, 0, None
    for row in rows:
        stored = _stored(row)
        expected = count + 1
        if stored.seq != expected:
            return models, count, anchored, f"its entry {expected} is missing or moved"
        if stored.prev_hash != previous:
            return models, count, anchored, f"its entry {expected} links to another before it"
        if not stored.intact:
            return models, count, anchored, f"its entry {expected} is edited"
        if stored.seq == at:
            anchored = stored.hash
        if stored.fields is not None and stored.fields["kind"] in _ABOUT_MODELS:
            models.append(stored)
        previous, count = stored.hash, expected
    return models, count, anchored, None


_MOVES_HEAD = {"commit", "rollback"}
_ABOUT_MODELS = {*_MOVES_HEAD, "mark"}  # the entries _contradicted reads


_Versions = dict[tuple[str, int], sa.Row[Any]]


def _registry(connection: sa.Connection) -> tuple[_Versions, dict[str, int]]:
    """Every model version (by name and number) and every model's HEAD, as stored."""
    try:
        versions = {
            (str(v.name), int(v.version)): v for v in connection.execute(sa.select(model_versions))
        }
        heads = {str(h.name): int(h.version) for h in connection.execute(sa.select(model_heads))}
    except (TypeError, ValueError) as exc:  # a column no longer of its type
        raise RegistryError(f"the model registry cannot be read (tampered?): {exc}") from exc
    return versions, heads


def _contradicted(
    rows: Sequence[_Stored],
    versions: _Versions,
    stored_heads: Mapping[str, int],
    *,
    entries: int | None = None,
) -> AuditProblem | None:
    """The first entry the model registry contradicts (see the module docstring), or None."""
    commits: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
    statuses: dict[tuple[str, int], tuple[int, str]] = {}
    heads: dict[str, tuple[int, int]] = {}
    for row in rows:
        fields = row.fields
        if fields is None:  # the chain's check names it
            continue
        name, at, number = str(fields["subject"]).rpartition("@v")
        kind, details = fields["kind"], fields["details"]
        if kind not in _ABOUT_MODELS or not at or not number.isdigit():
            continue
        key = (name, int(number))
        if kind == "commit":
            commits[key] = (row.seq, details)
            statuses[key] = (row.seq, str(details.get("status")))
        elif kind == "mark":
            statuses[key] = (row.seq, str(details.get("to")))
        if kind in _MOVES_HEAD:
            heads[name] = (row.seq, key[1])
    problems = [
        problem
        for key, (seq, details) in commits.items()
        if (problem := _version_problem(key, seq, details, versions.get(key), statuses))
    ]
    first_logged: dict[str, int] = {}
    for model, version in sorted(commits):
        first_logged.setdefault(model, version)
    problems += [
        AuditProblem(
            len(rows) if entries is None else entries,
            "contradicted",
            f"{model} version {version} has no commit entry",
        )
        for model, version in versions
        if model in first_logged
        and version > first_logged[model]
        and (model, version) not in commits
    ]
    problems += [
        AuditProblem(
            seq,
            "contradicted",
            f"HEAD of {model} is version {stored_heads.get(model)}; this entry moved it to "
            f"version {version}",
        )
        for model, (seq, version) in heads.items()
        if stored_heads.get(model) != version
    ]
    return min(problems, key=lambda problem: problem.seq, default=None)


def _version_problem(
    key: tuple[str, int],
    seq: int,
    details: Mapping[str, Any],
    stored: sa.Row[Any] | None,
    statuses: Mapping[tuple[str, int], tuple[int, str]],
) -> AuditProblem | None:
    """What of version ``key`` as ``stored`` its commit entry (at ``seq``) and its latest
    status entry contradict, or None."""
    name, number = key
    if stored is None:
        return AuditProblem(seq, "contradicted", f"{name} version {number} is gone")
    for field in ("round", "parent", "sha256"):
        if field in details and details[field] != getattr(stored, field):
            return AuditProblem(
                seq,
                "contradicted",
                f"{name} version {number}'s {field} is {getattr(stored, field)!r}; its commit "
                f"entry records {details[field]!r}",
            )
    digest = details.get("metrics_sha256")  # (a commit entry before the digest: none)
    if digest is not None and digest != metrics_digest(stored.metrics):
        return AuditProblem(
            seq, "contradicted", f"{name} version {number}'s metrics are not those it committed"
        )
    status_seq, status = statuses[key]
    stored_status = getattr(stored.status, "value", stored.status)
    if status != stored_status:
        return AuditProblem(
            status_seq,
            "contradicted",
            f"{name} version {number} is {stored_status}; its last entry made it {status}",
        )
    return None


def check_chain(rows: Sequence[_Stored]) -> AuditProblem | None:
    """The first break of the chain of ``rows`` (in seq order), or None."""
    by_hash = {row.hash: position for position, row in enumerate(rows)}
    previous = GENESIS_HASH
    for position, row in enumerate(rows):
        expected = position + 1
        if row.seq != expected:
            return _out_of_sequence(rows, position, by_hash, previous)
        if row.prev_hash != previous:
            return _broken_link(rows, position, by_hash)
        if not row.intact:
            return AuditProblem(expected, "edited", "its stored fields do not hash to its hash")
        previous = row.hash
    return None


def _out_of_sequence(
    rows: Sequence[_Stored], position: int, by_hash: dict[str, int], previous: str
) -> AuditProblem:
    expected, row = position + 1, rows[position]
    if row.seq < expected:
        return AuditProblem(row.seq, "edited", f"seq {row.seq} is out of the sequence 1, 2, 3...")
    moved = by_hash.get(row.prev_hash)
    if moved is not None and moved != position - 1:
        seq = rows[moved].seq
        return AuditProblem(expected, "edited", f"its seq was changed to {seq}")
    if row.prev_hash == previous:
        return AuditProblem(expected, "edited", f"its seq was changed to {row.seq}")
    return AuditProblem(
        expected, "deleted", f"missing: the log jumps from seq {expected - 1} to {row.seq}"
    )


def _broken_link(rows: Sequence[_Stored], position: int, by_hash: dict[str, int]) -> AuditProblem:
    expected, row = position + 1, rows[position]
    if position >= 2 and row.prev_hash == rows[position - 2].hash:
        return AuditProblem(
            expected - 1, "inserted", f"entries {expected - 2} and {expected} link to each other"
        )
    linked = by_hash.get(row.prev_hash)
    if linked is not None:
        return AuditProblem(
            expected, "reordered", f"it follows entry {rows[linked].seq}, not {expected - 1}"
        )
    if not row.intact and row.hashes_to(seq=row.seq + 1):
        return AuditProblem(expected, "deleted", "missing: the later entries were renumbered")
    if not row.intact:
        return AuditProblem(expected, "edited", "its stored fields do not hash to its hash")
    return AuditProblem(
        max(expected - 1, 1),
        "rewritten",
        f"entry {expected} does not link to entry {expected - 1} (one of them was rewritten)",
    )


def _unsigned_commit(rows: Sequence[_Stored], signed_seq: int | None) -> AuditProblem | None:
    """The last model commit when no verified head covers it: the run layer signs the head
    right after every commit, so a commit past the last signed head means heads were deleted
    (which would otherwise let the whole log be rewritten and rehashed unnoticed)."""
    commits = [row.seq for row in rows if row.fields is not None and row.fields["kind"] == "commit"]
    if commits and (signed_seq is None or signed_seq < commits[-1]):
        covered = "no head is signed" if signed_seq is None else f"the last is at seq {signed_seq}"
        return AuditProblem(
            commits[-1],
            "unsigned",
            f"a model commit no signed head covers ({covered}): signed heads were deleted?",
        )
    return None


def _check_heads(
    rows: Sequence[_Stored], heads: Sequence[SignedHead], verifier: HeadVerifier
) -> tuple[int | None, AuditProblem | None]:
    """The last seq a verified head covers, and the first bad head, if any."""
    by_seq = {row.seq: row for row in rows}
    signed_seq = None
    for head in heads:
        try:
            verifier(head)
        except ShoalError as exc:
            return signed_seq, AuditProblem(head.seq, "bad_signature", f"its signed head: {exc}")
        entry = by_seq.get(head.seq)
        if entry is None:
            missing = min(head.seq, len(rows) + 1)
            return signed_seq, AuditProblem(
                missing, "deleted", f"missing, but a head is signed at seq {head.seq}"
            )
        if entry.hash != head.hash:
            return signed_seq, AuditProblem(
                head.seq, "rewritten", "its hash is not the one signed at its seq"
            )
        signed_seq = head.seq
    return signed_seq, None
