"""``shoal rounds list|show``: a run's rounds, their participants, divergence and policy decisions.

Read from a run's folder (a coordinator's ``--state-dir``, or a simulated
run's ``--out``): the rows of ``metrics.jsonl``, and from its registry the
round's participants as stored (per-round pseudonyms, under ``[metadata]``)
with their divergence, and the update policy's decisions. ``--resolve``
maps pseudonyms back to client ids with the folder's ``pseudonym.key`` and
the client registry: only whoever can read that key can do it. Another run
in the registry (``--run-id``, with ``--registry URL`` for a shared one) has
no rows in this folder: ``list`` shows what the registry holds of its rounds.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from rich.table import Table
from rich.text import Text

from shoal.cli.app import app, user_errors
from shoal.cli.operator import (
    MAX_REGISTRY_INT,
    AsJson,
    RegistryUrl,
    StateDir,
    _cells,
    _console,
    _database,
    _iso,
    _key_value_table,
    _print_json,
)
from shoal.core.errors import ConfigError, NotFoundError
from shoal.dashboard.state import CONFIG_FILE, SIMULATED_MODEL, read_json
from shoal.governance.pseudonyms import PREFIX, PSEUDONYM_KEY_FILE, Pseudonyms
from shoal.registry import BlobStore, ClientRegistry, Database, ModelRegistry
from shoal.registry.decisions import DecisionRecord, PolicyDecisionLog
from shoal.registry.location import DEFAULT_STATE_DIR, blob_location
from shoal.registry.participation import Participation, ParticipationLog
from shoal.registry.schema import policy_decisions, round_participants
from shoal.telemetry.metrics import METRICS_FILE, MetricsLog

rounds_app = typer.Typer(
    help="A run's rounds: their rows, participants, divergence and policy decisions.",
    no_args_is_help=True,
)
app.add_typer(rounds_app, name="rounds")

RunId = Annotated[
    str | None,
    typer.Option(
        "--run-id",
        metavar="ID",
        show_default="the only run in the registry",
        help="The run whose rounds to read (a simulation's run.name, a coordinator's run_id).",
    ),
]
_PAGE = 1000  # clients read from the registry at a time, to resolve pseudonyms
_LISTED = ("round", "phase", "committed", "model_version", "reported", "accuracy", "loss")


@rounds_app.command("list")
@user_errors
def list_rounds(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    run_id: RunId = None,
    as_json: AsJson = False,
) -> None:
    """Every round's row: its version, accuracy, loss, flagged clients and playbook verdict.

    The rows are the folder's own run's; another run in the registry (--run-id)
    shows what the registry holds of each of its rounds: the version it
    committed, its participants, the flagged ones and the updates the policy
    denied.
    """
    if registry is None and run_id is None:  # the folder's own run: its metrics are the record
        _print_rows(_rows(state_dir), state_dir, as_json=as_json)
        return
    with _database(state_dir, registry, read_only=True) as database:
        own = folder_run(state_dir, database)
        run = run_id or own or _only_run(database, state_dir)
        recorded = [] if run == own else _recorded_rounds(database, run)
    if run == own:
        _print_rows(_rows(state_dir), state_dir, as_json=as_json)
    elif not recorded:
        hint = "" if own is None else f" (this folder's run is {own!r})"
        raise NotFoundError(f"run {run!r} has no rounds on record{hint}")
    elif as_json:
        _print_json(recorded)
    else:
        _console().print(_recorded_table(run, recorded))


def _print_rows(rows: list[dict[str, Any]], state_dir: Path, *, as_json: bool) -> None:
    if as_json:
        _print_json(rows)
        return
    table = Table(title="rounds", title_justify="left")
    for column in (*_LISTED, "test_accuracy", "flagged", "playbook"):
        table.add_column(column, justify="left" if column in ("phase", "playbook") else "right")
    for row in rows:
        table.add_row(
            *_cells(
                *(_short(row.get(key)) for key in _LISTED),
                _short(row.get("test_accuracy")),
                row.get("divergence_flagged"),
                _verdict(row.get("playbook")),
            )
        )
    _console().print(table if rows else f"no rounds in {state_dir / METRICS_FILE}")


def _recorded_rounds(database: Database, run_id: str) -> list[dict[str, Any]]:
    """Each round of ``run_id`` that the registry holds participants or policy decisions of
    (a run's rows are in its own folder only): the version it committed (None: it did not),
    how many took part, how many of them were flagged, how many updates the policy denied."""
    participation = ParticipationLog(database)
    decided = PolicyDecisionLog(database).decisions(run_id)
    denied = Counter(record.round for record in decided if not record.allowed)
    rounds = sorted({*participation.rounds(run_id), *(record.round for record in decided)})
    recorded = []
    for number in rounds:
        entries = participation.round(run_id, number)
        version = entries[-1].model_version if entries else None
        recorded.append(
            {
                "round": number,
                "committed": version is not None,
                "model_version": version,
                "participants": len(entries),
                "flagged": sum(1 for entry in entries if entry.flagged),
                "denied": denied[number],
            }
        )
    return recorded


def _recorded_table(run_id: str, recorded: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(title=Text(f"rounds of run {run_id}"), title_justify="left")
    columns = ("round", "committed", "model_version", "participants", "flagged", "denied")
    for column in columns:
        table.add_column(column, justify="left" if column == "committed" else "right")
    for row in recorded:
        committed = "yes" if row["committed"] else Text("no", style="red")
        table.add_row(*_cells(*(committed if key == "committed" else row[key] for key in columns)))
    return table


@rounds_app.command("show")
@user_errors
def show_round(
    round_number: Annotated[
        int, typer.Argument(metavar="N", min=0, max=MAX_REGISTRY_INT, help="The round.")
    ],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    run_id: RunId = None,
    resolve: Annotated[
        bool,
        typer.Option(
            "--resolve", help="Name the clients behind the pseudonyms (needs pseudonym.key)."
        ),
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Round N: its rows, its participants with their divergence, and the policy's decisions."""
    with _database(state_dir, registry, read_only=True) as database:
        own = folder_run(state_dir, database)
        run = run_id or own or _only_run(database, state_dir)
        # the folder's rows are its own run's; another run's are in no folder here
        rows = _rows(state_dir) if run == own else []
        rows = [row for row in rows if row.get("round") == round_number]
        participants = ParticipationLog(database).round(run, round_number)
        decisions = PolicyDecisionLog(database).decisions(run, round_number=round_number)
        if not rows and not participants and not decisions:
            hint = "" if own is None or own == run else f" (this folder's run is {own!r})"
            raise NotFoundError(f"run {run!r} has no round {round_number} on record{hint}")
        names = _resolver(database, state_dir, run, round_number) if resolve else None
    shown = {
        "run_id": run,
        "round": round_number,
        "rows": rows,
        "participants": [_participant(entry, names) for entry in participants],
        "decisions": [_decision(record, names) for record in decisions],
    }
    if as_json:
        _print_json(shown)
        return
    _print_round(shown, resolved=names is not None)


def _rows(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / METRICS_FILE
    if not path.exists():
        raise NotFoundError(f"{state_dir} holds no run ({METRICS_FILE} is missing)")
    return MetricsLog(path).rows()


def simulated_run(state_dir: Path, database: Database) -> str | None:
    """The run name of the simulation whose run folder ``state_dir`` is (its registry holds
    the simulation's model, :data:`SIMULATED_MODEL`); None for a coordinator's state, or a
    folder whose ``config.json`` names no run."""
    run = _section(read_json(state_dir / CONFIG_FILE), "run").get("name")
    if not isinstance(run, str) or not run:
        return None
    models = ModelRegistry(database, BlobStore(blob_location(state_dir, None)))
    return run if SIMULATED_MODEL in models.names() else None


def folder_run(state_dir: Path, database: Database) -> str | None:
    """The id that the run of ``state_dir`` keeps its records under: a simulation's
    ``run.name``, a coordinator's ``coordinator.run_id`` (a simulation's ``config.json`` holds
    that key's default too, which names nothing); None when the folder names no run."""
    simulated = simulated_run(state_dir, database)
    if simulated is not None:
        return simulated
    run_id = _section(read_json(state_dir / CONFIG_FILE), "coordinator").get("run_id")
    return run_id if isinstance(run_id, str) and run_id else None


def _section(config: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    """A section of a run folder's ``config.json``, empty where it is missing or malformed."""
    section = None if config is None else config.get(name)
    return section if isinstance(section, Mapping) else {}


def _only_run(database: Database, state_dir: Path) -> str:
    """The registry's one run with rounds on record (participants or policy decisions), for a
    folder that names no run of its own; else ask for --run-id."""
    with database.read() as connection:
        runs = sorted(
            {
                *connection.execute(sa.select(round_participants.c.run_id).distinct()).scalars(),
                *connection.execute(sa.select(policy_decisions.c.run_id).distinct()).scalars(),
            }
        )
    if not runs:
        raise ConfigError(
            f"give --run-id: {state_dir / CONFIG_FILE} names no run (it is missing or "
            "malformed), and the registry recorded no participants or policy decisions"
        )
    if len(runs) > 1:
        raise ConfigError(f"give --run-id: the registry holds rounds of runs {', '.join(runs)}")
    return str(runs[0])


def _resolver(
    database: Database, state_dir: Path, run_id: str, round_number: int
) -> dict[str, str]:
    """Each enrolled client's pseudonym in the round, to its id (the key file must be readable:
    it is never created here, since a new key would resolve nothing)."""
    key = state_dir / PSEUDONYM_KEY_FILE
    if not key.exists():
        raise ConfigError(f"--resolve needs the run's key, {key}: it is not there")
    names = Pseudonyms.in_folder(state_dir, run_id=run_id)
    clients = ClientRegistry(database)
    resolved: dict[str, str] = {}
    for offset in range(0, MAX_REGISTRY_INT, _PAGE):
        page = clients.list(limit=_PAGE, offset=offset)
        resolved |= {names.of(c.client_id, round_number=round_number): c.client_id for c in page}
        if len(page) < _PAGE:
            return resolved
    return resolved


def _participant(entry: Participation, names: Mapping[str, str] | None) -> dict[str, Any]:
    fields = dataclasses.asdict(entry)
    fields["recorded_at"] = _iso(entry.recorded_at)
    if names is not None:
        fields["client_id"] = _resolved(entry.participant, names)
    return fields


def _decision(record: DecisionRecord, names: Mapping[str, str] | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "participant": record.client_id,  # stored under the round's pseudonym, like the rest
        "allowed": record.allowed,
        "reasons": [{"code": code, "detail": detail} for code, detail in record.reasons],
        "facts": dict(record.facts),
        "decided_at": _iso(record.decided_at),
    }
    if names is not None:
        fields["client_id"] = _resolved(record.client_id, names)
    return fields


def _resolved(name: str, names: Mapping[str, str]) -> str | None:
    """The client behind ``name`` (a plain id stays itself; None: no enrolled client)."""
    if name in names:
        return names[name]
    return None if name.startswith(PREFIX) else name


def _print_round(shown: Mapping[str, Any], *, resolved: bool) -> None:
    console = _console()
    for row in shown["rows"]:
        title = f"round {shown['round']} ({row.get('phase')}) of run {shown['run_id']}"
        console.print(_key_value_table(title, {k: _short(v) for k, v in sorted(row.items())}))
    console.print(_participants_table(shown["participants"], resolved=resolved))
    console.print(_decisions_table(shown["decisions"], resolved=resolved))


def _participants_table(entries: Iterable[Mapping[str, Any]], *, resolved: bool) -> Table:
    table = Table(title="participants", title_justify="left")
    columns = ["participant", *(["client"] if resolved else []), "version", "l2 agg"]
    columns += ["cos agg", "l2 median", "cos median", "z", "flagged"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("participant", "client") else "right")
    for entry in entries:
        flagged = entry["flagged"]
        table.add_row(
            *_cells(
                entry["participant"],
                *([entry["client_id"] or "?"] if resolved else []),
                entry["model_version"],
                *(
                    _short(entry[key])
                    for key in (
                        "l2_to_aggregate",
                        "cosine_to_aggregate",
                        "l2_to_median",
                        "cosine_to_median",
                        "z_score",
                    )
                ),
                Text("yes", style="red") if flagged else ("no" if flagged is False else None),
            )
        )
    return table


def _decisions_table(decisions: Iterable[Mapping[str, Any]], *, resolved: bool) -> Table:
    table = Table(title="policy decisions", title_justify="left")
    for column in ("participant", *(["client"] if resolved else []), "allowed", "reasons"):
        table.add_column(column, overflow="fold")
    for decision in decisions:
        reasons = "; ".join(f"{r['code']}: {r['detail']}" for r in decision["reasons"])
        table.add_row(
            *_cells(
                decision["participant"],
                *([decision["client_id"] or "?"] if resolved else []),
                "yes" if decision["allowed"] else Text("no", style="red"),
                reasons or None,
            )
        )
    return table


def _short(value: Any) -> Any:
    """A float to four significant digits; anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else value


def _verdict(playbook: Mapping[str, Any] | None) -> Text | None:
    if not playbook:
        return None
    verdict = str(playbook.get("verdict"))
    back = playbook.get("rolled_back_to")
    text = verdict if back is None else f"{verdict}, HEAD back to {back}"
    return Text(text, style={"good": "green", "bad": "red"}.get(verdict, "yellow"))
