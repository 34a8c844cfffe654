"""Fleet telemetry's math: percentiles, drops, cohort fairness, bandwidth and the summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.telemetry.fleet import (
    UNKNOWN_CLASS,
    bandwidth_fields,
    class_accuracy,
    drop_fields,
    fairness_fields,
    percentile_fields,
    population_shares,
    summary_fields,
    timing_fields,
)

EMPTY = np.array([], dtype=np.float64)
seconds = st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=50)


def test_percentiles_of_nothing_are_none_and_ignore_non_finite_values() -> None:
    assert percentile_fields("rtt", EMPTY, suffix="_s") == {
        "rtt_p50_s": None,
        "rtt_p90_s": None,
        "rtt_p99_s": None,
    }
    fields = percentile_fields("x", np.array([1.0, math.nan, 3.0, math.inf]))
    assert fields["x_p50"] == 2.0
    huge = percentile_fields("x", [1e308, 1e308, 5e307])  # finite, though their sum is not
    assert huge == {"x_p50": 1e308, "x_p90": 1e308, "x_p99": 1e308}
    assert percentile_fields("x", [3.0, -math.inf, 1.0])["x_p50"] == 2.0


@given(
    st.lists(
        st.floats(-1e300, 1e300) | st.sampled_from([math.nan, math.inf, -math.inf]), max_size=30
    )
)
def test_percentiles_are_numpys_over_the_finite_values(values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    fields = percentile_fields("x", values)
    if not finite:
        assert set(fields.values()) == {None}
        return
    expected = np.percentile(finite, [50, 90, 99])
    assert [fields["x_p50"], fields["x_p90"], fields["x_p99"]] == expected.tolist()


@given(seconds)
def test_percentiles_are_ordered_and_within_the_values(values: list[float]) -> None:
    fields = percentile_fields("rtt", np.array(values), suffix="_s")
    p50, p90, p99 = fields["rtt_p50_s"], fields["rtt_p90_s"], fields["rtt_p99_s"]
    assert min(values) <= p50 <= p90 <= p99 <= max(values)


def test_the_straggler_index_is_the_p90_share_of_the_deadline() -> None:
    round_trips = np.arange(1.0, 11.0)  # 1..10 seconds, each had 20 seconds
    fields = timing_fields(round_trips, np.array([0.5, 1.5]), np.full(10, 20.0))
    assert fields["rtt_p50_s"] == pytest.approx(5.5)
    assert fields["deadline_share_p90"] == pytest.approx(np.percentile(round_trips, 90) / 20)
    assert fields["straggler_index"] == fields["deadline_share_p90"]
    assert fields["train_p50_s"] == pytest.approx(1.0)


def test_no_answer_means_no_timing_and_a_zero_window_no_share() -> None:
    fields = timing_fields(EMPTY, EMPTY, EMPTY)
    assert fields["straggler_index"] is None and fields["train_p99_s"] is None
    assert timing_fields(np.array([1.0]), EMPTY, np.array([0.0]))["straggler_index"] is None


def test_drop_rate_and_its_breakdown() -> None:
    fields = drop_fields(
        selected=10, reported=7, by_stage={"fit": 3, "unmask": 0}, by_reason={"deadline": 3}
    )
    assert fields == {
        "drop_rate": 0.3,
        "drops_by_stage": {"fit": 3},
        "drops_by_reason": {"deadline": 3},
    }
    assert drop_fields(selected=0, reported=0, by_stage={}, by_reason={})["drop_rate"] is None


@given(
    st.lists(st.sampled_from(["a", "b", "c"]), max_size=40),
    st.dictionaries(st.sampled_from(["a", "b", "d"]), st.integers(1, 100), min_size=1),
)
def test_participation_shares_add_to_one_and_name_every_class(
    participants: list[str], counts: dict[str, int]
) -> None:
    population = population_shares(counts.keys(), counts.values())
    fields = fairness_fields(population, participants)
    fairness = fields["fairness"]
    assert set(fairness) == set(population) | set(participants)
    assert sum(entry["population_share"] for entry in fairness.values()) == pytest.approx(1.0)
    if participants:
        shares = [entry["participation_share"] for entry in fairness.values()]
        assert sum(shares) == pytest.approx(1.0)
        gaps = [
            abs(entry["participation_share"] - entry["population_share"])
            for entry in fairness.values()
        ]
        assert fields["participation_gap"] == pytest.approx(max(gaps))
    else:
        assert fields["participation_gap"] is None
    assert fields["fairness_gap"] is None  # a fit round: no accuracy


def test_the_fairness_gap_is_the_mean_class_accuracy_minus_the_worst() -> None:
    accuracy = class_accuracy(
        ["fast", "fast", "slow", UNKNOWN_CLASS],
        np.array([10.0, 30.0, 20.0, 5.0]),
        np.array([1.0, 0.6, 0.4, 0.7]),
    )
    assert accuracy["fast"] == (40.0, pytest.approx(28.0))  # 10 * 1.0 + 30 * 0.6
    fields = fairness_fields({"fast": 0.5, "slow": 0.5}, ["fast", "slow"], accuracy)
    classes = fields["fairness"]
    assert classes["fast"]["accuracy"] == pytest.approx(0.7)
    assert classes["slow"]["accuracy"] == pytest.approx(0.4)
    assert classes[UNKNOWN_CLASS]["population_share"] == 0.0
    mean = (0.7 + 0.4 + 0.7) / 3
    assert fields["fairness_gap"] == pytest.approx(mean - 0.4)
    one_class = fairness_fields({"fast": 1.0}, ["fast"], class_accuracy(["fast"], *_one()))
    assert one_class["fairness_gap"] is None


def _one() -> tuple[np.ndarray, np.ndarray]:
    return np.array([1.0]), np.array([0.5])


def test_class_accuracy_of_nobody_is_empty() -> None:
    assert class_accuracy([], EMPTY, EMPTY) == {}
    assert population_shares([], []) == {}


def test_bandwidth_per_client() -> None:
    assert bandwidth_fields(bytes_up=300, bytes_down=1000, reported=3, selected=4) == {
        "bytes_up_per_client": 100.0,
        "bytes_down_per_client": 250.0,
    }
    assert bandwidth_fields(bytes_up=0, bytes_down=0, reported=0, selected=0) == {
        "bytes_up_per_client": None,
        "bytes_down_per_client": None,
    }


def test_the_summary_of_the_rows() -> None:
    rows = [
        {"phase": "fit", "selected": 10, "reported": 8, "bytes_up": 80, "bytes_down": 100,
         "straggler_index": 0.2, "drift_bimodal": True},
        {"phase": "evaluate", "selected": 5, "reported": 4, "bytes_up": 4, "bytes_down": 50,
         "straggler_index": 0.6, "fairness": {}, "fairness_gap": 0.1},
        {"phase": "fit", "selected": 5, "reported": 5, "bytes_up": 50, "bytes_down": 50},
    ]  # fmt: skip
    summary = summary_fields(rows)
    assert summary["drop_rate"] == pytest.approx(3 / 20)
    assert summary["straggler_index"] == pytest.approx(0.4)
    assert summary["fairness_gap"] == 0.1
    assert summary["bytes_up_per_client"] == pytest.approx(134 / 17)
    assert summary["bytes_down_per_client"] == pytest.approx(200 / 20)
    assert summary["drift_bimodal_rounds"] == 1
    nothing = summary_fields([])
    assert nothing["drop_rate"] is None and nothing["straggler_index"] is None
