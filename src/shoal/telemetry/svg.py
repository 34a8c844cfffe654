"""Charts as inline SVG text in pure Python: lines, scatters, bars, every string escaped.

Each chart is one ``<svg>`` element without a namespace URL (an HTML page
inlines it as is, and no external reference is left in a report), with a
title, axes with ticks and labels, a legend, and a ``<title>`` tooltip on
every point and bar. A chart with nothing to draw says why in its place.
"""

from __future__ import annotations

import html
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
DASHES = ("", "7 3", "2 3", "9 3 2 3", "4 4")

WIDTH = 640
HEIGHT = 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 34, 44
_LEGEND_ROW = 16
_LEGEND_COLUMNS = 2
_FONT = 'font-family="sans-serif" font-size="11"'


@dataclass(frozen=True)
class Series:
    """A line: ``points`` as (x, y), drawn in ``colour`` with an SVG ``dash`` pattern."""

    label: str
    points: tuple[tuple[float, float], ...]
    colour: str
    dash: str = ""


@dataclass(frozen=True)
class Point:
    """A scatter point with its colour and its tooltip."""

    x: float
    y: float
    colour: str
    tooltip: str


@dataclass(frozen=True)
class Bars:
    """One bar per group (None: no bar in that group), in one colour, named in the legend."""

    label: str
    values: tuple[float | None, ...]
    colour: str


def colour(index: int) -> str:
    """The ``index``-th colour of the palette (it cycles)."""
    return PALETTE[index % len(PALETTE)]


def dash(index: int) -> str:
    """The ``index``-th dash pattern (it cycles; the first is a solid line)."""
    return DASHES[index % len(DASHES)]


def escape(text: object) -> str:
    """``text`` safe inside SVG or HTML text and attributes."""
    return html.escape(str(text), quote=True)


def format_number(value: float) -> str:
    """A short label: 1.2k, 3.4M, 0.25, 1e-05."""
    size = abs(value)
    if size >= 1000:
        for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if size >= scale:
                return f"{value / scale:.3g}{suffix}"
    if size != 0 and size < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def nice_ticks(low: float, high: float, *, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high] (1, 2 or 5 times a power of ten).

    Any finite pair is drawn, since clients choose the figures a run plots: a span wider
    than the largest float is measured in halves, ticks past it are the largest float, and a
    span too narrow for a normal float's step is ticked at its two ends.
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        return [low]
    count = max(count, 1)
    span = high - low
    raw = span / count if math.isfinite(span) else (high / 2 - low / 2) / count * 2
    if raw < sys.float_info.min:
        return [low, high]
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(power * m for m in (1, 2, 5, 10) if power * m >= raw)
    first = math.floor(low / step)
    steps = math.ceil(high / step - first - 1e-9)  # the last tick covers high
    digits = 2 - math.floor(math.log10(step))  # drops the float noise of (first + i) * step
    ticks = [_finite(round((first + index) * step, digits)) for index in range(max(steps, 1) + 1)]
    ticks[0], ticks[-1] = min(ticks[0], low), max(ticks[-1], high)  # below the floats' grain
    return ticks


def _finite(value: float) -> float:
    """``value``, or the largest float of its sign where it overflowed."""
    return max(-sys.float_info.max, min(sys.float_info.max, value))


def _share(value: float, low: float, high: float) -> float:
    """Where ``value`` lies from ``low`` (0) to ``high`` (1); 0.5 when they are one. A span
    wider than the largest float is taken in halves."""
    if high == low:
        return 0.5
    span = high - low
    if math.isfinite(span):
        return (value - low) / span
    return (value / 2 - low / 2) / (high / 2 - low / 2)


class _Frame:
    """The plot area of one chart: maps data to pixels and draws the axes."""

    def __init__(
        self, xs: Sequence[float], ys: Sequence[float], *, width: int, plot_height: int
    ) -> None:
        self.width, self.plot_height = width, plot_height
        self.x_ticks = nice_ticks(*_span(xs))
        self.y_ticks = nice_ticks(*_span(ys))
        self.x_range = (self.x_ticks[0], self.x_ticks[-1])
        self.y_range = (self.y_ticks[0], self.y_ticks[-1])

    def x(self, value: float) -> float:
        return _LEFT + _share(value, *self.x_range) * (self.width - _LEFT - _RIGHT)

    def y(self, value: float) -> float:
        return _TOP + (1 - _share(value, *self.y_range)) * (self.plot_height - _TOP - _BOTTOM)

    def axes(self, *, x_label: str, y_label: str, x_ticks: bool = True) -> list[str]:
        bottom, right = self.plot_height - _BOTTOM, self.width - _RIGHT
        parts = [
            f'<g class="axes" {_FONT} fill="#333">',
            f'<line x1="{_LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
            f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}" stroke="#333"/>',
        ]
        for tick in self.x_ticks if x_ticks else ():
            x = self.x(tick)
            parts.append(
                f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#333"/>'
                f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">'
                f"{escape(format_number(tick))}</text>"
            )
        for tick in self.y_ticks:
            y = self.y(tick)
            parts.append(
                f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                f'<line x1="{_LEFT - 4}" y1="{y:.1f}" x2="{_LEFT}" y2="{y:.1f}" stroke="#333"/>'
                f'<text x="{_LEFT - 7}" y="{y + 4:.1f}" text-anchor="end">'
                f"{escape(format_number(tick))}</text>"
            )
        middle_x = (_LEFT + right) / 2
        middle_y = (_TOP + bottom) / 2
        parts.append(
            f'<text x="{middle_x:.1f}" y="{bottom + 32}" text-anchor="middle">'
            f"{escape(x_label)}</text>"
            f'<text x="14" y="{middle_y:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {middle_y:.1f})">{escape(y_label)}</text></g>'
        )
        return parts


def _span(values: Sequence[float]) -> tuple[float, float]:
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if low == high:
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high


def _open(title: str, *, width: int, height: int, kind: str) -> str:
    return (
        f'<svg class="chart {kind}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">'
        f"<title>{escape(title)}</title>"
        f'<rect width="{width}" height="{height}" fill="#fff"/>'
        f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-family="sans-serif" '
        f'font-size="14" font-weight="bold">{escape(title)}</text>'
    )


def _legend(entries: Sequence[tuple[str, str, str]], *, top: float, width: int) -> list[str]:
    """Legend rows under the plot: (label, colour, dash); an empty colour is a plain note."""
    parts = [f'<g class="legend" {_FONT}>']
    column_width = (width - _LEFT) / _LEGEND_COLUMNS
    for index, (label, stroke, pattern) in enumerate(entries):
        row, column = divmod(index, _LEGEND_COLUMNS)
        x = _LEFT + column * column_width
        y = top + row * _LEGEND_ROW
        if stroke:
            dashing = f' stroke-dasharray="{pattern}"' if pattern else ""
            parts.append(
                f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 22:.1f}" y2="{y - 4:.1f}" '
                f'stroke="{stroke}" stroke-width="2"{dashing}/>'
            )
        parts.append(
            f'<text x="{x + (28 if stroke else 0):.1f}" y="{y:.1f}" '
            f'fill="{"#222" if stroke else "#a33"}">{escape(label)}</text>'
        )
    parts.append("</g>")
    return parts


def _legend_height(entries: int) -> int:
    return math.ceil(entries / _LEGEND_COLUMNS) * _LEGEND_ROW + 6 if entries else 0


def _chart(
    title: str,
    *,
    kind: str,
    axes: list[str],
    body: list[str],
    legend: Sequence[tuple[str, str, str]],
    width: int,
    height: int,
) -> str:
    """A chart's ``<svg>``: its title, ``axes``, ``body`` and, under the plot, its legend."""
    total = height + _legend_height(len(legend))
    return "".join(
        [
            _open(title, width=width, height=total, kind=kind),
            *axes,
            *body,
            *_legend(legend, top=height + 4, width=width),
            "</svg>",
        ]
    )


def placeholder(title: str, message: str, *, width: int = WIDTH, height: int = 120) -> str:
    """A chart's place when there is nothing to draw: its title and ``message``."""
    return (
        _open(title, width=width, height=height, kind="empty")
        + f'<text class="not-recorded" x="{width / 2:.1f}" y="{height / 2 + 10:.1f}" '
        f'text-anchor="middle" {_FONT} fill="#a33">{escape(message)}</text></svg>'
    )


def line_chart(
    *,
    title: str,
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    notes: Sequence[str] = (),
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """Lines with a point (and its tooltip) at each value; ``notes`` join the legend."""
    drawn = [line for line in series if line.points]
    if not drawn:
        return placeholder(title, "; ".join(notes) or "nothing to plot", width=width)
    frame = _Frame(
        [x for line in drawn for x, _ in line.points],
        [y for line in drawn for _, y in line.points],
        width=width,
        plot_height=height,
    )
    entries = [(line.label, line.colour, line.dash) for line in drawn]
    entries += [(note, "", "") for note in notes]
    parts = []
    for line in drawn:
        dashing = f' stroke-dasharray="{line.dash}"' if line.dash else ""
        path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in line.points)
        parts.append(
            f'<g class="series"><polyline points="{path}" fill="none" stroke="{line.colour}" '
            f'stroke-width="1.6"{dashing}><title>{escape(line.label)}</title></polyline>'
        )
        for x, y in line.points:
            parts.append(
                f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="2.4" '
                f'fill="{line.colour}"><title>{escape(line.label)}: {escape(x_label)} '
                f"{escape(format_number(x))}, {escape(format_number(y))}</title></circle>"
            )
        parts.append("</g>")
    axes = frame.axes(x_label=x_label, y_label=y_label)
    return _chart(
        title, kind="line", axes=axes, body=parts, legend=entries, width=width, height=height
    )


def scatter_chart(
    *,
    title: str,
    points: Sequence[Point],
    legend: Sequence[tuple[str, str]] = (),
    x_label: str = "",
    y_label: str = "",
    width: int = WIDTH,
    height: int = HEIGHT,
    radius: float = 3.5,
) -> str:
    """Points with their tooltips; ``legend`` names the colours as (label, colour)."""
    if not points:
        return placeholder(title, "nothing to plot", width=width, height=height)
    frame = _Frame(
        [point.x for point in points],
        [point.y for point in points],
        width=width,
        plot_height=height,
    )
    entries = [(label, fill, "") for label, fill in legend]
    parts = ['<g class="points">']
    for point in points:
        parts.append(
            f'<circle cx="{frame.x(point.x):.1f}" cy="{frame.y(point.y):.1f}" r="{radius}" '
            f'fill="{point.colour}" fill-opacity="0.8" stroke="#fff" stroke-width="0.5">'
            f"<title>{escape(point.tooltip)}</title></circle>"
        )
    parts.append("</g>")
    axes = frame.axes(x_label=x_label, y_label=y_label)
    return _chart(
        title, kind="scatter", axes=axes, body=parts, legend=entries, width=width, height=height
    )


def bar_chart(
    *,
    title: str,
    groups: Sequence[str],
    bars: Sequence[Bars],
    y_label: str,
    references: Sequence[float | None] = (),
    reference_label: str = "",
    notes: Sequence[str] = (),
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """Grouped bars, one group per name in ``groups``; ``references`` draws a black mark
    per group (a population's share, say), named ``reference_label`` in the legend."""
    values = [value for bar in bars for value in bar.values if value is not None]
    marks = [value for value in references if value is not None]
    if not groups or not (values or marks):
        return placeholder(title, "; ".join(notes) or "nothing to plot", width=width)
    frame = _Frame([0.0, 1.0], [0.0, *values, *marks], width=width, plot_height=height)
    slot = (width - _LEFT - _RIGHT) / len(groups)
    bar_width = slot * 0.8 / max(len(bars), 1)
    base = frame.y(0.0)
    entries = [(bar.label, bar.colour, "") for bar in bars]
    if marks:
        entries.append((reference_label, "#000", ""))
    entries += [(note, "", "") for note in notes]
    parts = []
    for index, bar in enumerate(bars):
        parts.append('<g class="series">')
        for group, value in enumerate(bar.values):
            if value is None or group >= len(groups):
                continue
            x = _LEFT + group * slot + slot * 0.1 + index * bar_width
            top = frame.y(value)
            parts.append(
                f'<rect x="{x:.1f}" y="{min(top, base):.1f}" width="{bar_width:.1f}" '
                f'height="{abs(base - top):.1f}" fill="{bar.colour}"><title>'
                f"{escape(bar.label)}, {escape(groups[group])}: {escape(format_number(value))}"
                "</title></rect>"
            )
        parts.append("</g>")
    for group, value in enumerate(references[: len(groups)]):
        if value is not None:
            x = _LEFT + group * slot
            y = frame.y(value)
            parts.append(
                f'<line x1="{x + slot * 0.05:.1f}" y1="{y:.1f}" x2="{x + slot * 0.95:.1f}" '
                f'y2="{y:.1f}" stroke="#000" stroke-width="2"><title>{escape(reference_label)}, '
                f"{escape(groups[group])}: {escape(format_number(value))}</title></line>"
            )
    axes = _bar_axes(frame, groups, slot=slot, y_label=y_label)
    return _chart(
        title, kind="bar", axes=axes, body=parts, legend=entries, width=width, height=height
    )


def _bar_axes(frame: _Frame, groups: Sequence[str], *, slot: float, y_label: str) -> list[str]:
    parts = frame.axes(x_label="", y_label=y_label, x_ticks=False)
    bottom = frame.plot_height - _BOTTOM
    parts.append(f'<g class="groups" {_FONT}>')
    parts += [
        f'<text x="{_LEFT + (index + 0.5) * slot:.1f}" y="{bottom + 30}" text-anchor="middle">'
        f"{escape(name)}</text>"
        for index, name in enumerate(groups)
    ]
    parts.append("</g>")
    return parts


def grid(title: str, panels: Sequence[str], *, columns: int, width: int = WIDTH) -> str:
    """Charts (each an ``<svg>`` with width and height) side by side, ``columns`` a row."""
    sizes = [_size(panel) for panel in panels]
    rows = [sizes[start : start + columns] for start in range(0, len(sizes), columns)]
    heights = [max(height for _, height in row) for row in rows]
    total = 30 + sum(heights)
    wide = max(width, *(sum(w for w, _ in row) for row in rows))
    parts = [_open(title, width=int(wide), height=int(total), kind="grid")]
    y = 30.0
    for row_index, row in enumerate(rows):
        x = 0.0
        for column, (panel_width, _) in enumerate(row):
            panel = panels[row_index * columns + column]
            parts.append(panel.replace("<svg ", f'<svg x="{x:.0f}" y="{y:.0f}" ', 1))
            x += panel_width
        y += heights[row_index]
    parts.append("</svg>")
    return "".join(parts)


def _size(panel: str) -> tuple[float, float]:
    head = panel[: panel.index(">")]
    width = float(head.split('width="', 1)[1].split('"', 1)[0])
    height = float(head.split('height="', 1)[1].split('"', 1)[0])
    return width, height
