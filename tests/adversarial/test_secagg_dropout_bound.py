"""SecAgg+ at 20 clients, degree 7 and 30% dropout: refused by configuration, with the degree
that works.

Every round of that setting aborted ("too few unmask shares arrived"): a
secret needs 5 of its 8 holders, and 30% dropout leaves fewer for some
client almost surely. The configuration now refuses any degree whose
rounds would abort with probability above 5% at the configured dropout
(``secure_aggregation.expected_dropout``, else the devices' mean), and names
the degree that stays within it.
"""

from __future__ import annotations

import numpy as np
import pytest

from shoal.config import parse_config
from shoal.coordinator.setup import secure_settings_from_config
from shoal.core import ConfigError
from shoal.core.sharing import reconstruction_threshold, round_failure_bound
from shoal.secure.client import Contribution
from shoal.secure.graph import neighbour_graph
from shoal.secure.loopback import run_loopback_round
from shoal.secure.messages import Stage
from shoal.secure.server import Aborted, StageDeadlines, SumReady

DEADLINES = StageDeadlines(advertise_keys=5, share_keys=5, masked_input=60, unmask=5)


def _config(**secure: object) -> object:
    return parse_config(
        {
            "data": {"num_clients": 100},
            "round": {"clients_per_round": 20, "over_selection": 1.0},
            "secure_aggregation": {"protocol": "secagg+", **secure},
        }
    )


def _round(degree: int, seed: int) -> SumReady | Aborted:
    rng = np.random.default_rng(seed)
    contributions = {
        f"c{i:02d}": Contribution(rng.uniform(-1, 1, 8).astype(np.float32), 10) for i in range(20)
    }
    gone = rng.choice(sorted(contributions), size=6, replace=False)  # 30%
    outcome = run_loopback_round(
        contributions,
        degree=degree,
        dropouts=dict.fromkeys(gone, Stage.MASKED_INPUT),
        deadlines=DEADLINES,
        seed=seed,
    )
    return outcome.result


def test_degree_7_at_30_percent_dropout_is_refused_naming_the_degree_needed() -> None:
    with pytest.raises(ConfigError) as refused:
        secure_settings_from_config(_config(degree=7, expected_dropout=0.3), run_id="r")
    message = str(refused.value)
    assert "secure_aggregation.degree = 7 over 20 clients" in message
    assert "at 30% dropout, above the 5% allowed: set secure_aggregation.degree = 19" in message
    assert "\n" not in message
    settings = secure_settings_from_config(_config(degree=19, expected_dropout=0.3), run_id="r")
    assert settings is not None and settings.degree == 19


def test_the_devices_dropout_counts_when_none_is_stated() -> None:
    devices = {"classes": [{"name": "phone", "share": 1.0, "dropout": 0.3}]}
    config = parse_config(
        {
            "round": {"clients_per_round": 20, "over_selection": 1.0},
            "devices": devices,
            "secure_aggregation": {"protocol": "secagg+", "degree": 7},
        }
    )
    with pytest.raises(ConfigError, match="degree = 19"):
        secure_settings_from_config(config, run_id="r")


def test_no_degree_is_enough_when_the_cohort_is_too_small_for_the_dropout() -> None:
    config = parse_config(
        {
            "round": {"clients_per_round": 6, "over_selection": 1.0},
            "secure_aggregation": {"protocol": "secagg+", "expected_dropout": 0.4},
        }
    )
    with pytest.raises(ConfigError, match="no degree is enough"):
        secure_settings_from_config(config, run_id="r")


def test_the_refused_setting_does_abort_and_the_named_degree_survives() -> None:
    assert all(isinstance(_round(7, seed), Aborted) for seed in range(3))
    assert all(isinstance(_round(19, seed), SumReady) for seed in range(3))


@pytest.mark.parametrize(
    ("degree", "dropout"), [(7, 0.1), (7, 0.3), (10, 0.1), (19, 0.3), (19, 0.45)]
)
def test_the_bound_holds_over_the_real_graph(degree: int, dropout: float) -> None:
    """Drop clients at random over the very graph the server draws; count rounds that lack
    t live holders for some secret: never more than the bound (beyond sampling noise)."""
    nodes = 20
    threshold = reconstruction_threshold(degree=degree, num_nodes=nodes)
    graph = neighbour_graph(nodes, degree=degree, seed=b"bound")
    adjacency = np.zeros((nodes, nodes), dtype=np.int64)
    for node, neighbours in graph.items():
        adjacency[node - 1, [n - 1 for n in neighbours]] = 1
    rng = np.random.default_rng(11)
    trials = 4000
    alive = rng.random((trials, nodes)) >= dropout
    live_holders = alive.astype(np.int64) @ adjacency + alive  # neighbours alive, plus itself
    failed = (live_holders < threshold).any(axis=1)
    bound = round_failure_bound(
        num_nodes=nodes, degree=degree, threshold=threshold, dropout=dropout
    )
    noise = 4 * np.sqrt(max(bound, 1e-3) * (1 - bound) / trials)
    assert failed.mean() <= bound + noise
