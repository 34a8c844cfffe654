"""The SVG charts: ticks cover the data, empty charts say so, every string is escaped."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.telemetry import svg

finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)


@given(finite, finite)
def test_the_ticks_cover_the_range(a: float, b: float) -> None:
    low, high = min(a, b), max(a, b)
    ticks = svg.nice_ticks(low, high)
    assert ticks == sorted(ticks)
    if high > low:
        assert ticks[0] <= low and ticks[-1] >= high
        assert 2 <= len(ticks) <= 12


def test_a_point_and_a_constant_get_an_axis() -> None:
    chart = svg.line_chart(
        title="t",
        series=[svg.Series("one", ((1.0, 5.0),), svg.colour(0))],
        x_label="round",
        y_label="v",
    )
    root = ET.fromstring(chart)
    assert len(list(root.iter("circle"))) == 1
    assert len(list(root.iter("text"))) > 4  # the title, tick labels, axis labels


def test_empty_charts_say_so() -> None:
    for chart in (
        svg.line_chart(title="t", series=[], x_label="x", y_label="y", notes=["not recorded"]),
        svg.line_chart(title="t", series=[svg.Series("s", (), "#000")], x_label="x", y_label="y"),
        svg.scatter_chart(title="t", points=[]),
        svg.bar_chart(title="t", groups=[], bars=[], y_label="y"),
        svg.bar_chart(title="t", groups=["g"], bars=[svg.Bars("b", (None,), "#000")], y_label="y"),
    ):
        root = ET.fromstring(chart)
        assert root.get("class") == "chart empty"
        assert "not recorded" in chart or "nothing to plot" in chart


def test_every_string_is_escaped() -> None:
    evil = '<b onload="x">&'
    chart = svg.bar_chart(
        title=evil,
        groups=[evil],
        bars=[svg.Bars(evil, (0.5,), svg.colour(1))],
        y_label=evil,
        references=[0.4],
        reference_label=evil,
        notes=[evil],
    )
    root = ET.fromstring(chart)
    assert "<b " not in chart
    assert evil in "".join(root.itertext())


def test_numbers_are_short() -> None:
    assert [svg.format_number(v) for v in (0, 0.25, 1500, 2.5e6, 3e9, 1e-5)] == [
        "0",
        "0.25",
        "1.5k",
        "2.5M",
        "3G",
        "1.0e-05",
    ]


def test_a_grid_nests_its_panels() -> None:
    panel = svg.placeholder("p", "m", width=200, height=100)
    root = ET.fromstring(svg.grid("g", [panel, panel, panel], columns=2))
    nested = root.findall("svg")
    assert [(p.get("x"), p.get("y")) for p in nested] == [("0", "30"), ("200", "30"), ("0", "130")]
    assert root.get("height") == "230"


any_finite = st.floats(allow_nan=False, allow_infinity=False)


@given(any_finite, any_finite)
def test_the_ticks_cover_any_finite_range(a: float, b: float) -> None:
    """A client picks its reported figures: the widest span (past the largest float) and the
    narrowest (two subnormals apart) still get finite, ordered ticks that cover the data."""
    low, high = min(a, b), max(a, b)
    ticks = svg.nice_ticks(low, high)
    assert ticks == sorted(ticks) and all(math.isfinite(tick) for tick in ticks)
    assert ticks[0] <= low and ticks[-1] >= high


@pytest.mark.parametrize(
    "values", [(0.0, 5e-324), (0.0, 1e-320), (-1.7e308, 1.7e308), (1e308, -1e308)]
)
def test_a_chart_of_extreme_figures_is_drawn_inside_its_frame(values: tuple[float, ...]) -> None:
    chart = svg.line_chart(
        title="t",
        series=[svg.Series("one", tuple(enumerate(values, 1)), svg.colour(0))],
        x_label="round",
        y_label="v",
    )
    root = ET.fromstring(chart)
    for circle in root.iter("circle"):
        assert 0 <= float(circle.get("cx", "nan")) <= svg.WIDTH
        assert 0 <= float(circle.get("cy", "nan")) <= svg.HEIGHT
