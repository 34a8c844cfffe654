"""The figures of runs as inline SVG: every plot of the report and the dashboard.

A plot is data (:class:`LinePlot`: what each line reads from a row), drawn
for one run or for several overlaid (one colour per run, one dash per
line); a run that did not record a plot's data is named with "not recorded
in this run" instead of the plot disappearing. :func:`figures` draws them
all, the fairness bars by device class and the drift projections too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.telemetry import svg
from shoal.telemetry.metrics import Row

NOT_RECORDED = "not recorded in this run"
_EARLIER_DRIFT_PANELS = 6  # small multiples of earlier rounds under the last one


@dataclass(frozen=True)
class RunData:
    """What a report knows of one run: its rows, its summary (empty while it runs) and its
    drift projections, under the name the report shows."""

    name: str
    folder: Path
    rows: tuple[Row, ...]
    summary: dict[str, Any]
    drift: tuple[Row, ...]


@dataclass(frozen=True)
class Figure:
    """One plot of the report: its title, a stable key (the HTML anchor), inline ``<svg>``."""

    title: str
    key: str
    svg: str


# --- line plots as data ----------------------------------------------------------------------

Value = Callable[[Row], "float | None"]


@dataclass(frozen=True)
class Line:
    """One line of a plot: its label and how a row gives its value (None: no point)."""

    label: str
    value: Value


@dataclass(frozen=True)
class LinePlot:
    """A plot of rows: one line per :class:`Line` and run, over ``x`` (a row's field);
    ``per_round`` sums the rows of a round (fit and evaluate) into one point."""

    key: str
    title: str
    y_label: str
    lines: tuple[Line, ...]
    x: str = "round"
    per_round: bool = False
    sparse: bool = False  # lines without a point are left out (the clusters a run did not have)


def number(value: Any) -> float | None:
    """``value`` as a finite float, else None (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer past any float
        return None
    return number if math.isfinite(number) else None


def field(name: str, phase: str | None = None) -> Value:
    """A row's numeric ``name``, from rows of ``phase`` only (None: any phase)."""

    def value(row: Row) -> float | None:
        if phase is not None and row.get("phase") != phase:
            return None
        return number(row.get(name))

    return value


def entry(name: str, key: str, phase: str) -> Value:
    """The number under ``key`` of a row's mapping ``name`` (``cluster_accuracy``), from rows
    of ``phase``."""

    def value(row: Row) -> float | None:
        table = row.get(name)
        if row.get("phase") != phase or not isinstance(table, dict):
            return None
        return number(table.get(key))

    return value


MAX_CLUSTERS_DRAWN = 8


def drop_rate(phase: str) -> Value:
    """The row's ``drop_rate``; in a row from before it was recorded, the share of the
    selected clients that did not report (the same figure)."""

    def value(row: Row) -> float | None:
        if row.get("phase") != phase:
            return None
        if "drop_rate" in row:
            return number(row["drop_rate"])
        selected, reported = number(row.get("selected")), number(row.get("reported"))
        if not selected or reported is None:
            return None
        return (selected - reported) / selected

    return value


def _accuracy_and_loss(x: str, unit: str) -> list[LinePlot]:
    return [
        LinePlot(
            f"accuracy-{unit}",
            f"Accuracy by {unit}",
            "accuracy",
            (
                # the test_ column: a fit row's accuracy is the clients' where no central
                # evaluation ran, and a client chooses it
                Line("central test", field("test_accuracy", "fit")),
                Line("federated evaluation", field("accuracy", "evaluate")),
            ),
            x=x,
        ),
        LinePlot(
            f"loss-{unit}",
            f"Loss by {unit}",
            "loss",
            (
                Line("training (fit)", field("loss", "fit")),
                Line("central test", field("test_loss", "fit")),
                Line("federated evaluation", field("loss", "evaluate")),
            ),
            x=x,
        ),
    ]


def _percentiles(prefix: str, suffix: str = "") -> tuple[Line, ...]:
    return tuple(Line(f"p{p}", field(f"{prefix}_p{p}{suffix}", "fit")) for p in (50, 90, 99))


LINE_PLOTS: tuple[LinePlot, ...] = (
    *_accuracy_and_loss("round", "round"),
    *_accuracy_and_loss("virtual_time_s", "virtual time (s)"),
    LinePlot(
        "drop-rate",
        "Drop rate (asked clients that did not report)",
        "share of the asked clients",
        (Line("fit", drop_rate("fit")), Line("evaluate", drop_rate("evaluate"))),
    ),
    LinePlot(
        "straggler-index",
        "Straggler index: share of the deadline used (p90 is the index)",
        "round trip / deadline",
        _percentiles("deadline_share"),
    ),
    LinePlot(
        "round-trip",
        "Client round-trip time (fit)",
        "seconds",
        _percentiles("rtt", "_s"),
    ),
    LinePlot(
        "training-time",
        "Client training time (fit)",
        "seconds",
        _percentiles("train", "_s"),
    ),
    LinePlot(
        "fairness-gap",
        "Fairness gaps by device class",
        "gap",
        (
            Line("accuracy gap (mean - worst)", field("fairness_gap", "evaluate")),
            Line("participation gap", field("participation_gap", "fit")),
        ),
    ),
    LinePlot(
        "divergence",
        "Divergence of client updates from the aggregate",
        "L2 distance",
        (
            Line("median", field("divergence_median", "fit")),
            Line("p90", field("divergence_p90", "fit")),
            Line("max", field("divergence_max", "fit")),
        ),
    ),
    LinePlot(
        "cluster-accuracy",
        "Federated accuracy by cluster model (clustered FL)",
        "accuracy",
        tuple(
            Line(f"cluster {c}", entry("cluster_accuracy", str(c), "evaluate"))
            for c in range(MAX_CLUSTERS_DRAWN)
        ),
        sparse=True,
    ),
    LinePlot(
        "epsilon", "Privacy budget spent (epsilon)", "epsilon", (Line("epsilon", field("epsilon")),)
    ),
    LinePlot(
        "bytes",
        "Bytes per round (fit and evaluate)",
        "bytes",
        (Line("up", field("bytes_up")), Line("down", field("bytes_down"))),
        per_round=True,
    ),
    LinePlot(
        "bytes-per-client",
        "Bytes per asked client (fit)",
        "bytes",
        (
            Line("up", field("bytes_up_per_client", "fit")),
            Line("down", field("bytes_down_per_client", "fit")),
        ),
    ),
)


def _points(run: RunData, plot: LinePlot, line: Line) -> tuple[tuple[float, float], ...]:
    points: dict[float, float] = {}
    listed: list[tuple[float, float]] = []
    for row in run.rows:
        x, y = number(row.get(plot.x)), line.value(row)
        if x is None or y is None:
            continue
        if plot.per_round:
            points[x] = points.get(x, 0.0) + y
        else:
            listed.append((x, y))
    return tuple(sorted(points.items())) if plot.per_round else tuple(listed)


def line_figure(runs: Sequence[RunData], plot: LinePlot) -> Figure:
    """``plot`` over ``runs``: colour per line for one run, colour per run (dash per line)
    for several; a run without a point says "not recorded"."""
    many = len(runs) > 1
    series: list[svg.Series] = []
    notes: list[str] = []
    for run_index, run in enumerate(runs):
        drawn = []
        for line_index, line in enumerate(plot.lines):
            drawn.append(
                svg.Series(
                    label=f"{run.name}: {line.label}" if many else line.label,
                    points=_points(run, plot, line),
                    colour=svg.colour(run_index if many else line_index),
                    dash=svg.dash(line_index) if many else "",
                )
            )
        if not any(line.points for line in drawn):
            notes.append(_not_recorded(run, many=many))
        elif plot.sparse:
            drawn = [line for line in drawn if line.points]
        series += drawn
    x_label = "round" if plot.x == "round" else "virtual time (s)"
    return Figure(
        plot.title,
        plot.key,
        svg.line_chart(
            title=plot.title, series=series, x_label=x_label, y_label=plot.y_label, notes=notes
        ),
    )


def _not_recorded(run: RunData, *, many: bool) -> str:
    return f"{run.name}: {NOT_RECORDED}" if many else NOT_RECORDED


# --- fairness by device class ----------------------------------------------------------------


def _fairness_rows(run: RunData, phase: str) -> list[dict[str, Any]]:
    return [
        row["fairness"]
        for row in run.rows
        if row.get("phase") == phase and isinstance(row.get("fairness"), dict)
    ]


def _class_figure(name: str, entry: Any) -> float | None:
    return number(entry.get(name)) if isinstance(entry, dict) else None


def participation(run: RunData) -> dict[str, tuple[float | None, float | None]]:
    """Per device class: (mean participation share over the fit rounds, population share)."""
    shares: dict[str, list[float]] = {}
    population: dict[str, float | None] = {}
    for fairness in _fairness_rows(run, "fit"):
        for device_class, entry in fairness.items():
            share = _class_figure("participation_share", entry)
            shares.setdefault(str(device_class), [])
            if share is not None:
                shares[str(device_class)].append(share)
            population[str(device_class)] = _class_figure("population_share", entry)
    return {
        name: (sum(values) / len(values) if values else None, population.get(name))
        for name, values in shares.items()
    }


def class_accuracy(run: RunData) -> dict[str, float | None]:
    """Per device class: the federated-evaluation accuracy of the last evaluate row with one."""
    rows = _fairness_rows(run, "evaluate")
    if not rows:
        return {}
    return {str(name): _class_figure("accuracy", entry) for name, entry in sorted(rows[-1].items())}


def fairness_figures(runs: Sequence[RunData]) -> list[Figure]:
    """Participation against population share, and accuracy, by device class (bars per run)."""
    shares = [participation(run) for run in runs]
    accuracies = [class_accuracy(run) for run in runs]
    classes = sorted({name for table in shares for name in table})
    evaluated = sorted({name for table in accuracies for name in table})
    references: list[float | None] = []
    for name in classes:
        known = [table[name][1] for table in shares if name in table]
        references.append(next((value for value in known if value is not None), None))
    participation_title = "Participation share by device class (mean over fit rounds)"
    accuracy_title = "Federated-evaluation accuracy by device class (last evaluation)"
    return [
        Figure(
            participation_title,
            "fairness-participation",
            svg.bar_chart(
                title=participation_title,
                groups=classes,
                bars=_bars(runs, [{k: v[0] for k, v in t.items()} for t in shares], classes),
                y_label="share of the participants",
                references=references,
                reference_label="population share",
                notes=_missing(runs, shares),
            ),
        ),
        Figure(
            accuracy_title,
            "fairness-accuracy",
            svg.bar_chart(
                title=accuracy_title,
                groups=evaluated,
                bars=_bars(runs, accuracies, evaluated),
                y_label="accuracy",
                notes=_missing(runs, accuracies),
            ),
        ),
    ]


def _missing(runs: Sequence[RunData], tables: Sequence[dict[str, Any]]) -> list[str]:
    """The "not recorded" notes of the runs whose table is empty."""
    many = len(runs) > 1
    return [
        _not_recorded(run, many=many) for run, table in zip(runs, tables, strict=True) if not table
    ]


def _bars(
    runs: Sequence[RunData], tables: Sequence[dict[str, float | None]], groups: Sequence[str]
) -> list[svg.Bars]:
    return [
        svg.Bars(run.name, tuple(table.get(name) for name in groups), svg.colour(index))
        for index, (run, table) in enumerate(zip(runs, tables, strict=True))
        if table
    ]


# --- drift projections -----------------------------------------------------------------------


def _drift_panel(record: Row, *, title: str, width: int, height: int) -> str:
    points, labels, clients = (_list(record.get(name)) for name in ("points", "labels", "clients"))
    dots = []
    seen: set[int] = set()
    for index, point in enumerate(points):
        if not isinstance(point, list | tuple) or len(point) < 2:
            continue
        x, y = number(point[0]), number(point[1])
        if x is None or y is None:
            continue
        label = labels[index] if index < len(labels) and isinstance(labels[index], int) else -1
        seen.add(label)
        client = clients[index] if index < len(clients) else f"client {index}"
        dots.append(
            svg.Point(x, y, svg.colour(label), f"{client}: cluster {label}, round {_round(record)}")
        )
    variance = [number(v) for v in _list(record.get("explained_variance"))]
    axis = [f"PC{i + 1}" + (f" ({v:.0%})" if v is not None else "") for i, v in enumerate(variance)]
    method = str(record.get("method") or "pca")
    named = ["PC1", "PC2"] if method == "pca" else [f"{method} 1", f"{method} 2"]
    axis += named[len(axis) :]
    return svg.scatter_chart(
        title=title,
        points=dots,
        legend=[(f"cluster {label}", svg.colour(label)) for label in sorted(seen)],
        x_label=axis[0],
        y_label=axis[1],
        width=width,
        height=height,
    )


def _list(value: Any) -> list[Any]:
    """A record's list, or none (a record of another shape draws what it can)."""
    return value if isinstance(value, list) else []


def _round(record: Row) -> int:
    value = record.get("round")
    return value if isinstance(value, int) else 0


def _earlier(records: Sequence[Row]) -> list[Row]:
    """Up to a few earlier rounds, evenly spread, oldest first."""
    if len(records) <= _EARLIER_DRIFT_PANELS:
        return list(records)
    step = (len(records) - 1) / (_EARLIER_DRIFT_PANELS - 1)
    return [records[round(index * step)] for index in range(_EARLIER_DRIFT_PANELS)]


def drift_figure(runs: Sequence[RunData]) -> Figure:
    """The drift projection of each run: the last round large, a few earlier rounds small."""
    title = "Drift: projection of client updates, coloured by cluster"
    if not any(run.drift for run in runs):
        message = NOT_RECORDED if len(runs) == 1 else "not recorded in these runs"
        return Figure(title, "drift", svg.placeholder(title, message))
    blocks = [_drift_block(run, many=len(runs) > 1) for run in runs]
    return Figure(title, "drift", svg.grid(title, blocks, columns=1))


def _drift_block(run: RunData, *, many: bool) -> str:
    """One run's panels (or its "not recorded" line)."""
    name = f"{run.name}: " if many else ""
    if not run.drift:
        return svg.placeholder(f"{name}drift", _not_recorded(run, many=many))
    last = run.drift[-1]
    panels = [_drift_panel(last, title=f"round {_round(last)} (last)", width=640, height=380)]
    earlier = [
        _drift_panel(record, title=f"round {_round(record)}", width=213, height=200)
        for record in _earlier(run.drift[:-1])
    ]
    if earlier:
        panels.append(svg.grid("earlier rounds", earlier, columns=3))
    return svg.grid(f"{name}the last round, then earlier ones", panels, columns=1)


# --- every figure ----------------------------------------------------------------------------

FIGURE_KEYS = (
    *(plot.key for plot in LINE_PLOTS),
    "fairness-participation",
    "fairness-accuracy",
    "drift",
)


def figures(runs: Sequence[RunData]) -> list[Figure]:
    """Every plot of ``runs`` (overlaid when several), in :data:`FIGURE_KEYS` order."""
    if not runs:
        return []
    drawn = {plot.key: line_figure(runs, plot) for plot in LINE_PLOTS}
    drawn.update((figure.key, figure) for figure in fairness_figures(runs))
    drawn["drift"] = drift_figure(runs)
    return [drawn[key] for key in FIGURE_KEYS]
