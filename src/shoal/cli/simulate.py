"""``shoal simulate``: run a federated training job in the deterministic simulator."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shoal.cli.app import app, quiet_logging, user_errors
from shoal.client.app import app_search_path, with_config_folder
from shoal.config import Config, load_config
from shoal.core.errors import ConfigError, RunError
from shoal.simulation.runner import Simulation, resumed_config

console = Console(highlight=False)


def _resolve(
    config_path: Path | None, resume: Path | None, overrides: list[str]
) -> tuple[Config, Path | None]:
    if resume is None:
        return load_config(config_path, overrides), None
    if config_path is not None:
        raise ConfigError("--resume takes the run's own config; do not pass CONFIG as well")
    return resumed_config(resume, overrides), resume


@app.command()
@user_errors
def simulate(
    config_path: Annotated[
        Path | None,
        typer.Argument(
            metavar="[CONFIG.toml]",
            help="Run configuration; the embedded digits scenario if omitted.",
        ),
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", "-r", min=1, help="Number of training rounds.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", "-s", min=0, help="Seed of the whole run.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run folder (default: runs/NAME-TIMESTAMP).")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume", help="Continue the stopped run in this folder from its last version."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a config value, as section.key=value (TOML value); repeatable."
        ),
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="Print only the run folder and the final summary; log only errors (MLflow's too).",
        ),
    ] = False,
) -> None:
    """Simulate federated training in virtual time: same seed, same run, bit for bit.

    Writes metrics.jsonl (one line per round and phase), summary.json and
    every model version into the run folder.
    """
    if quiet:
        quiet_logging()
    extra = list(overrides or [])
    if rounds is not None:
        extra.append(f"run.rounds={rounds}")
    if seed is not None:
        if resume is not None:
            raise ConfigError("--resume keeps the run's own seed; do not pass --seed")
        extra.append(f"run.seed={seed}")
    if out is not None and resume is not None:
        raise ConfigError("--resume continues the run in its own folder; do not pass --out")
    config, resume_dir = _resolve(config_path, resume, extra)
    config = with_config_folder(config, config_path)
    folder = (
        resume_dir or out or Path("runs") / f"{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    simulation = Simulation(
        config, folder, resume=resume_dir is not None, search_path=app_search_path(config)
    )
    console.print(f"run folder: {folder}", soft_wrap=True)  # a path whole, for scripts too
    summary = _run_with_progress(simulation, config, quiet=quiet)
    _print_summary(summary)
    why = None if simulation.lifecycle is None else simulation.lifecycle.nothing_committed
    if why is not None:
        raise RunError(f"{why} (run folder {folder})")


def _run_with_progress(simulation: Simulation, config: Config, *, quiet: bool) -> dict[str, Any]:
    progress = Progress(
        TextColumn("[bold]rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet,
    )
    if not quiet:
        print_header()
    with progress:
        task = progress.add_task("rounds", total=config.run.rounds)

        def on_round(row: dict[str, Any]) -> None:
            if not quiet:
                progress.console.print(format_row(row))
                for line in round_notes(row):
                    progress.console.print(line)
            if row["phase"] == "fit":
                progress.update(task, completed=row["round"])

        return simulation.run(on_round=on_round)


def print_header() -> None:
    """The column titles of the per-round lines."""
    console.print(
        f"{'round':>5} {'phase':<8} {'sel':>4} {'rep':>4} {'drop':>4} {'loss':>8} {'acc':>7} "
        f"{'virtual':>9} {'wall':>7}"
    )


def _number(value: float | None, spec: str, width: int) -> str:
    """``value`` in ``spec``, or a dash in the same width (a loss withheld under DP)."""
    return f"{'-':>{width}}" if value is None else format(value, f"{width}{spec}")


def format_row(row: dict[str, Any]) -> str:
    status = "" if row["committed"] else f"  aborted: {row['abort_reason']}"
    return (
        f"{row['round']:>5} {row['phase']:<8} {row['selected']:>4} {row['reported']:>4} "
        f"{row['dropped']:>4} "
        f"{_number(row['loss'], '.4f', 8)} {_number(row['accuracy'], '.2%', 7)} "
        f"{row['virtual_time_s']:>8.1f}s {row['wall_time_s']:>6.2f}s{status}"
    )


def round_notes(row: dict[str, Any]) -> list[str]:
    """The lines under a round's line: why clients failed, one line per reason (most frequent
    first), the fallback the round took when too much of its cohort dropped, and the split of
    the model into cluster models (``[clustering] start = "flagged"``)."""
    lines = [
        escape(f"      failed: {count} x {reason}")
        for reason, count in (row.get("failures") or {}).items()
    ]
    fallback = row.get("fallback")
    if fallback:
        done = {
            "reselect": f", {fallback['replacements']} replacements asked",
            "extend": f", deadline extended by {fallback['extended_by_s']:g}s",
        }.get(fallback["kind"], "")
        note = f" ({fallback['note']})" if fallback.get("note") else ""
        lines.append(
            escape(
                f"      fallback {fallback['kind']} when {fallback['dropped']} of "
                f"{fallback['cohort']} had dropped{done}{note}"
            )
        )
    split = row.get("clustered_split")
    if split:
        sizes = " and ".join(str(size) for size in split["sizes"])
        lines.append(  # the drift flagged distinct populations (the row's drift_bimodal)
            f"      clustered: the model splits into {split['clusters']} cluster models "
            f"({sizes} clients)"
        )
    return lines


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="summary", show_header=False)
    for key in (
        "rounds_completed",
        "rounds_aborted",
        "final_accuracy",
        "final_test_loss",
        "final_loss",
        "virtual_time_s",
        "wall_time_s",
        "num_parameters",
        "bytes_up",
        "bytes_down",
        "model_version",
    ):
        value = summary.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    if summary.get("privacy") is not None:  # DP is on: what the run spent
        table.add_row("epsilon", f"{summary['epsilon']:.4f} ({summary['accounting']})")
        for key, form in (("delta", ".3g"), ("noise_multiplier", ".4f")):  # unset: never planned
            value = summary.get(key)
            table.add_row(key, "-" if value is None else format(value, form))
        if summary.get("privacy_locked"):
            table.add_row("privacy_locked", escape(str(summary["privacy_locked"])))
    if summary.get("secure_aggregation", "none") != "none":
        table.add_row("secure_aggregation", str(summary["secure_aggregation"]))
        table.add_row("clients_recovered", str(summary.get("clients_recovered", 0)))
    counted = statistics_line(summary)
    if counted is not None:
        table.add_row("statistics", counted)
    console.print(table)


def statistics_line(summary: Mapping[str, Any], *, folder: Path | None = None) -> str | None:
    """What a statistics run ([statistics]) counted and the file it wrote (in ``folder``,
    when given), from its summary; None for any other run."""
    statistics = summary.get("statistics")
    if not isinstance(statistics, Mapping):
        return None
    file = statistics["file"] if folder is None else str(folder / statistics["file"])
    unresolved = statistics.get("unresolved") or 0
    return (
        f"{file}: {statistics['features']} features, "
        f"{statistics['examples']} records of {statistics['clients']} clients"
        + (f", {unresolved} unresolved" if unresolved else "")
    )
