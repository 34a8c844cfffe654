"""The dashboard's HTML: the page's shell and the fragment the page swaps in at each poll.

Everything that comes from the run or its registry (names, reasons, device
classes, numbers) is escaped here; the figures are the report's own SVG
(:mod:`shoal.telemetry.report`), which escapes its text itself. A figure a
run did not record reads "not recorded", as in the report.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shoal.dashboard.state import Row, Snapshot
from shoal.registry import ClientStatus, ModelRecord, ModelStatus
from shoal.telemetry.report import Figure

NOT_RECORDED = "not recorded"
POLL_INTERVAL_MS = 1000

# (row key, label, format): the newest fit row's figures, then the newest evaluate row's
FIT_TILES = (
    ("drop_rate", "drop rate", ".1%"),
    ("straggler_index", "straggler index", ".2f"),
    ("rtt_p90_s", "round trip p90", ".2f s"),
    ("divergence_median", "divergence median", ".3g"),
    ("bytes_up_per_client", "bytes up / client", ",.0f"),
    ("bytes_down_per_client", "bytes down / client", ",.0f"),
    ("drift_clusters", "drift clusters", "d"),
    ("drift_bimodal", "bimodal population", "yes/no"),
    ("epsilon", "epsilon spent", ".4f"),
)
EVALUATE_TILES = (
    ("fairness_gap", "fairness gap", ".2%"),
    ("participation_gap", "participation gap", ".2%"),
)
_STATUS_CLASS = {
    ModelStatus.GOOD: "good",
    ModelStatus.BAD: "bad",
    ModelStatus.CANDIDATE: "candidate",
}


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def formatted(value: Any, spec: str) -> str:
    """``value`` in ``spec`` (a unit may follow it after a space, ``yes/no`` is for a flag);
    "not recorded" when absent."""
    if value is None or isinstance(value, bool) != (spec == "yes/no"):
        return NOT_RECORDED
    if spec == "yes/no":
        return "yes" if value else "no"
    number, _, unit = spec.partition(" ")
    try:
        text = format(value, number)
    except (TypeError, ValueError):
        text = str(value)
    return f"{text} {unit}".strip()


def page(fragment: str, *, revision: str, title: str) -> str:
    """The whole page: the fragment, and the script that polls for the next one."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · Shoal dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard.css">
</head>
<body>
<header><h1>Shoal dashboard</h1><span id="live" class="live">live</span></header>
<main id="dashboard" data-revision="{escape(revision)}"
 data-poll-ms="{POLL_INTERVAL_MS}">{fragment}</main>
<script src="/dashboard.js"></script>
</body>
</html>
"""


def fragment(snapshot: Snapshot, figures: Sequence[Figure]) -> str:
    """The part of the page that changes: the run's numbers, figures, versions, clients and
    privacy budget."""
    parts = [
        _overview(snapshot),
        _figures(figures),
        _versions(snapshot),
        _clients(snapshot),
        _privacy(snapshot),
    ]
    return "\n".join(parts)


def _overview(snapshot: Snapshot) -> str:
    current = snapshot.current_round
    state = "finished" if snapshot.finished else ("running" if current else "waiting")
    stop = (snapshot.summary or {}).get("stop_reason")
    tiles = [
        ("round", "-" if current is None else str(current), "current-round"),
        ("accuracy", formatted(_newest(snapshot.rows, "accuracy"), ".2%"), "accuracy"),
        ("loss", formatted(_newest(snapshot.rows, "loss"), ".4f"), "loss"),
    ]
    tiles += _tiles(snapshot.last_row("fit"), FIT_TILES)
    tiles += _tiles(snapshot.last_row("evaluate"), EVALUATE_TILES)
    cells = "".join(
        f'<div class="tile"><dt>{escape(label)}</dt><dd id="{key}">{escape(value)}</dd></div>'
        for label, value, key in tiles
    )
    notes = "".join(
        f'<p class="note">{escape(note)}</p>'
        for note in (snapshot.registry_note, None if not stop else f"training stopped: {stop}")
        if note
    )
    return (
        f'<section id="overview"><h2>run <span id="run-name">{escape(snapshot.run_name)}</span>'
        f' <span id="run-state" class="state {state}">{state}</span></h2>'
        f'<p class="folder">{escape(snapshot.folder)}</p>{notes}<dl class="tiles">{cells}</dl>'
        "</section>"
    )


def _newest(rows: Sequence[Row], key: str) -> Any:
    """The newest non-null ``key`` of any row."""
    return next((row[key] for row in reversed(rows) if row.get(key) is not None), None)


def _tiles(row: Row | None, wanted: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [
        (label, formatted(None if row is None else row.get(key), spec), key.replace("_", "-"))
        for key, label, spec in wanted
    ]


def _figures(figures: Sequence[Figure]) -> str:
    if not figures:
        return '<section id="figures"><h2>figures</h2><p>no rounds yet</p></section>'
    shown = "".join(
        f'<figure id="figure-{escape(figure.key)}">{figure.svg}</figure>' for figure in figures
    )
    return f'<section id="figures"><h2>figures</h2><div class="grid">{shown}</div></section>'


def _versions(snapshot: Snapshot) -> str:
    if not snapshot.versions:
        return '<section id="versions"><h2>model versions</h2><p>none committed yet</p></section>'
    rows = "".join(
        _version_row(record, head=record.version == snapshot.head) for record in snapshot.versions
    )
    shown = len(snapshot.versions)
    more = (
        ""
        if shown == snapshot.versions_total
        else f" (newest {shown} of {snapshot.versions_total})"
    )
    header = "".join(
        f"<th>{name}</th>"
        for name in (
            "",
            "version",
            "round",
            "status",
            "reason",
            "accuracy",
            "sha256",
            "features",
            "scaler",
            "created",
        )
    )
    return (
        f'<section id="versions"><h2>model versions of {escape(snapshot.model)}{more}</h2>'
        f"<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _version_row(record: ModelRecord, *, head: bool) -> str:
    status = record.status
    cells = (
        "HEAD" if head else "",
        record.version,
        record.round,
        f'<span class="status {_STATUS_CLASS[status]}">{escape(status.value)}</span>',
        record.status_reason or "",
        formatted(record.metrics.get("accuracy"), ".2%"),
        record.sha256[:12],
        "" if record.features_sha256 is None else record.features_sha256[:12],  # its module
        "" if record.preprocessing_sha256 is None else record.preprocessing_sha256[:12],
        f"{record.created_at:%Y-%m-%d %H:%M:%S}",
    )
    return (
        "<tr>"
        + "".join(
            f"<td>{cell if index == 3 else escape(cell)}</td>" for index, cell in enumerate(cells)
        )
        + "</tr>"
    )


def _clients(snapshot: Snapshot) -> str:
    census = snapshot.census
    if not census:
        return '<section id="clients"><h2>clients</h2><p>none enrolled yet</p></section>'
    statuses = list(ClientStatus)
    classes = sorted({device for _, device in census}, key=lambda name: (name is None, name or ""))
    header = "".join(f"<th>{escape(status.value)}</th>" for status in statuses)
    body = "".join(_census_row(census, device, statuses) for device in classes)
    totals = [sum(n for (s, _), n in census.items() if s is status) for status in statuses]
    total_cells = "".join(f"<td>{count}</td>" for count in totals)
    return (
        '<section id="clients"><h2>clients by status and device class</h2><table>'
        f"<thead><tr><th>device class</th>{header}<th>total</th></tr></thead><tbody>{body}"
        f'<tr class="total"><th>all</th>{total_cells}<td>{sum(totals)}</td></tr>'
        "</tbody></table></section>"
    )


def _census_row(
    census: Mapping[tuple[ClientStatus, str | None], int],
    device: str | None,
    statuses: Sequence[ClientStatus],
) -> str:
    counts = [census.get((status, device), 0) for status in statuses]
    cells = "".join(f"<td>{count}</td>" for count in counts)
    name = "unreported" if device is None else device
    return f"<tr><th>{escape(name)}</th>{cells}<td>{sum(counts)}</td></tr>"


def _privacy(snapshot: Snapshot) -> str:
    budget = snapshot.budget
    title = '<section id="privacy"><h2>privacy budget</h2>'
    if budget is None:
        enabled = (snapshot.config.get("privacy") or {}).get("enabled")
        said = "no budget opened yet" if enabled else "differential privacy is off for this run"
        return f"{title}<p>{said}</p></section>"
    share = 0.0 if budget.epsilon <= 0 else min(1.0, budget.epsilon_spent / budget.epsilon)
    lock = (
        ""
        if budget.lock_reason is None
        else f'<p class="note">locked: {escape(budget.lock_reason)}</p>'
    )
    facts = (
        ("epsilon spent", f"{budget.epsilon_spent:.4f}"),
        ("epsilon budget", f"{budget.epsilon:.4g}"),
        ("remaining", f"{budget.remaining:.4f}"),
        ("delta", f"{budget.delta:.3g}"),
        ("last round", "-" if budget.last_round is None else str(budget.last_round)),
    )
    cells = "".join(
        f'<div class="tile"><dt>{label}</dt><dd>{escape(value)}</dd></div>'
        for label, value in facts
    )
    return (
        f'{title}<meter id="epsilon-meter" min="0" max="1" high="0.8" value="{share:.4f}">'
        f"{share:.0%}</meter>"
        f'<dl class="tiles">{cells}</dl>{lock}</section>'
    )
