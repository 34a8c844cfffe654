"""Per-client divergence: its measures' ranges and symmetries, who is flagged, the row fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.aggregation.divergence import (
    MAD_FLOOR,
    MAD_SCALE,
    MEASURES,
    DivergenceReport,
    DivergenceRule,
    column_medians,
    measure_divergence,
)
from shoal.core.errors import StrategyError

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def rounds(draw: st.DrawFn) -> np.ndarray:
    """A round's updates: 1 to 8 clients, 1 to 6 parameters, zero rows allowed."""
    clients = draw(st.integers(1, 8))
    size = draw(st.integers(1, 6))
    values = draw(st.lists(finite, min_size=clients * size, max_size=clients * size))
    return np.array(values, np.float32).reshape(clients, size)


def honest_round(*, clients: int = 9, size: int = 50, seed: int = 0) -> np.ndarray:
    """Similar honest updates: one direction plus a little noise each."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=size)
    return (direction + 0.1 * rng.normal(size=(clients, size))).astype(np.float32)


def names(count: int) -> list[str]:
    return [f"client-{index}" for index in range(count)]


def measure(updates: np.ndarray, **rule: int | float) -> DivergenceReport:
    return measure_divergence(
        names(len(updates)), updates, updates.mean(axis=0), rule=DivergenceRule(**rule)
    )


@settings(max_examples=60, deadline=None)
@given(rounds())
def test_distances_are_non_negative_and_cosines_within_one(updates: np.ndarray) -> None:
    report = measure(updates)
    assert len(report.clients) == len(updates) and report.available
    for client in report.clients:
        assert client.l2_to_aggregate >= 0 and client.l2_to_median >= 0
        assert -1 <= client.cosine_to_aggregate <= 1 and -1 <= client.cosine_to_median <= 1
        assert client.z_score >= 0 and not math.isnan(client.z_score)


@settings(max_examples=40, deadline=None)
@given(rounds(), st.randoms(use_true_random=False))
def test_the_order_of_the_clients_changes_nothing(updates: np.ndarray, rng: object) -> None:
    order = list(range(len(updates)))
    rng.shuffle(order)  # type: ignore[attr-defined]
    first = {c.client_id: c for c in measure(updates).clients}
    shuffled = measure_divergence(
        [f"client-{index}" for index in order], updates[order], updates.mean(axis=0)
    )
    for client in shuffled.clients:
        other = first[client.client_id]
        assert client.flagged == other.flagged
        for name in MEASURES:
            assert getattr(client, name) == pytest.approx(getattr(other, name), abs=1e-9)


@pytest.mark.parametrize("attack", ["sign_flip", "scaled_10x"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_poisoned_update_among_honest_ones_is_the_one_flagged(attack: str, seed: int) -> None:
    updates = honest_round(seed=seed)
    updates[4] = -updates[4] if attack == "sign_flip" else 10 * updates[4]
    report = measure(updates)
    assert report.flagged == ("client-4",)
    poisoned = report.clients[4]
    if attack == "sign_flip":
        assert poisoned.cosine_to_median < -0.5
    else:
        assert poisoned.z_score > 3.5


def test_honest_rounds_flag_nobody() -> None:
    # without the MAD's floor, 15 honest clients of these 40 rounds were flagged (4 of 9 in one)
    flagged = [measure(honest_round(seed=seed)).flagged for seed in range(40)]
    assert all(found == () for found in flagged)


def test_nobody_is_flagged_below_min_clients() -> None:
    updates = honest_round(clients=3)
    updates[0] = -10 * updates[0]
    assert measure(updates).flagged == ()
    assert measure(updates, min_clients=3).flagged == ("client-0",)


def test_zero_updates_have_no_direction_and_a_free_rider_stands_out() -> None:
    zeros = np.zeros((5, 4), np.float32)
    report = measure(zeros)
    assert report.flagged == ()
    assert all(c.l2_to_median == 0 and c.cosine_to_median == 0 for c in report.clients)
    updates = honest_round(clients=8, size=10)
    updates[2] = 0.0  # a free rider: returns the global model unchanged
    report = measure(updates)
    assert report.clients[2].cosine_to_median == 0 and report.flagged == ("client-2",)


def test_an_empty_round_measures_nobody() -> None:
    report = measure_divergence([], np.zeros((0, 3), np.float32), np.zeros(3, np.float32))
    assert report.available and report.clients == () and report.flagged == ()
    assert report.row_fields() == {"divergence_available": True, "divergence_flagged": 0}


def test_sampled_coordinates_give_the_same_flags_on_a_clear_case() -> None:
    updates = honest_round(clients=10, size=4000, seed=3)
    updates[7] = -updates[7]
    updates[1] = 10 * updates[1]
    full = measure(updates)
    sampled = measure(updates, max_values=4000)  # 400 of the 4000 coordinates
    assert sampled.sampled_coordinates == 400 and full.sampled_coordinates is None
    assert sampled.flagged == full.flagged == ("client-1", "client-7")
    assert sampled.row_fields()["divergence_sampled_coordinates"] == 400
    again = measure(updates, max_values=4000)
    assert [c.l2_to_median for c in again.clients] == [c.l2_to_median for c in sampled.clients]


def test_the_row_fields_summarize_the_distance_to_the_aggregate() -> None:
    updates = honest_round()
    updates[0] = -updates[0]
    report = measure(updates)
    fields = report.row_fields()
    distances = np.array([c.l2_to_aggregate for c in report.clients])
    assert fields["divergence_available"] is True
    assert fields["divergence_flagged"] == 1
    assert fields["divergence_median"] == pytest.approx(np.median(distances))
    assert fields["divergence_p90"] == pytest.approx(np.quantile(distances, 0.9))
    assert fields["divergence_max"] == pytest.approx(distances.max())
    assert set(fields["divergence"]) == set(MEASURES)
    spread = fields["divergence"]["cosine_to_median"]
    assert spread["min"] <= spread["median"] <= spread["p90"] <= spread["max"]
    assert "client-0" not in str(fields)  # the row holds aggregates, never a client


def test_an_unavailable_report_says_why_in_the_row() -> None:
    report = DivergenceReport.unavailable("only the sum is seen")
    assert not report.available and report.flagged == ()
    assert report.row_fields() == {
        "divergence_available": False,
        "divergence_note": "only the sum is seen",
    }


def test_a_client_entry_gives_its_stored_fields() -> None:
    [entry] = measure(np.ones((1, 2), np.float32)).clients
    assert set(entry.fields()) == {*MEASURES, "z_score", "flagged"}


@pytest.mark.parametrize(
    "rule",
    [
        {"max_z": 0.0},
        {"max_z": math.inf},
        {"min_cosine": -1.5},
        {"min_clients": 0},
        {"max_values": 0},
    ],
)
def test_a_bad_rule_is_refused(rule: dict[str, float]) -> None:
    with pytest.raises(StrategyError):
        DivergenceRule(**rule)  # type: ignore[arg-type]


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(StrategyError, match="one update row per client"):
        measure_divergence(["a"], np.zeros((2, 3), np.float32), np.zeros(3, np.float32))
    with pytest.raises(StrategyError):
        measure_divergence(["a"], np.zeros((1, 3), np.float32), np.zeros(4, np.float32))


@settings(max_examples=60, deadline=None)
@given(rounds())
def test_column_medians_are_numpys(updates: np.ndarray) -> None:
    """The same values (a zero's sign aside: numpy's mean of one -0.0 is 0.0; no distance
    tells them apart)."""
    matrix = updates.astype(np.float64)
    np.testing.assert_array_equal(column_medians(matrix), np.median(matrix, axis=0))


@settings(max_examples=60, deadline=None)
@given(rounds())
def test_the_reference_measures_are_numpys_own(updates: np.ndarray) -> None:
    """The measures against numpy's plain formulas: norms, cosines clipped to [-1, 1], the
    modified z-score over numpy's medians."""
    names = [f"c{i}" for i in range(len(updates))]
    aggregate = updates.mean(axis=0)
    report = measure_divergence(names, updates, aggregate)
    matrix = updates.astype(np.float64)
    median = np.median(matrix, axis=0)
    for reference, (l2_name, cosine_name) in (
        (aggregate.astype(np.float64), ("l2_to_aggregate", "cosine_to_aggregate")),
        (median, ("l2_to_median", "cosine_to_median")),
    ):
        l2 = np.linalg.norm(matrix - reference, axis=1)
        norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(reference)
        cosine = np.clip(
            np.divide(matrix @ reference, norms, out=np.zeros(len(names)), where=norms > 0), -1, 1
        )
        got = [(getattr(c, l2_name), getattr(c, cosine_name)) for c in report.clients]
        assert [g[0] for g in got] == pytest.approx(l2.tolist(), rel=1e-9, abs=1e-9)
        assert [g[1] for g in got] == pytest.approx(cosine.tolist(), rel=1e-6, abs=1e-6)
    distances = np.array([client.l2_to_median for client in report.clients])
    centre = np.median(distances)
    mad = max(float(np.median(np.abs(distances - centre))), MAD_FLOOR * abs(centre))
    if mad > 0:
        expected = (MAD_SCALE * np.abs(distances - centre) / mad).tolist()
        assert [client.z_score for client in report.clients] == expected
