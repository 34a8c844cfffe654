"""The engine under a split rule: one model until a round's drift flags groups, then a stack
of group models aggregated per cluster; its strategy follows the layout of what it restores."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.aggregation import PerCluster
from shoal.aggregation.drift import DriftRule
from shoal.aggregation.strategy import make_strategy
from shoal.coordinator import (
    CommitVersion,
    Coordinator,
    Phase,
    RoundSettings,
    SendFitTask,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.split import SplitRule
from shoal.core import Parameters, StrategyError
from shoal.core.clusters import split_models, stack_models, stacked_clusters

SIZE = 6
CANDIDATES = tuple(f"c{index:02d}" for index in range(8))
DAY, NIGHT = np.eye(2, SIZE, dtype=np.float32), np.eye(2, SIZE, 3, dtype=np.float32)


def engine(*, split: SplitRule | None = None, drift: bool = True) -> Coordinator:
    return Coordinator(
        settings=RoundSettings(clients_per_round=8, over_selection=1.0, deadline_s=100.0),
        strategy=make_strategy("fedavg"),
        parameters=Parameters.from_arrays([np.ones(SIZE)], names=["w"]),
        seed=3,
        drift=DriftRule() if drift else None,
        split=split,
    )


def play(coordinator: Coordinator, round_number: int, night_at: float = 1.0) -> CommitVersion:
    """A round whose even clients step along one axis and odd ones along another (``night_at``
    times as far, so that 0 makes one population of the round)."""
    actions = coordinator.handle(StartRound(round_number, Phase.FIT, 0.0, CANDIDATES))
    tasks = [a for a in actions if isinstance(a, SendFitTask)]
    rng = np.random.default_rng(round_number)
    for index, task in enumerate(tasks):
        cluster = stacked_clusters(task.parameters)
        direction = DAY[0] if index % 2 == 0 else DAY[0] + night_at * (NIGHT[0] - DAY[0])
        step = (direction + 0.01 * rng.standard_normal(SIZE)).astype(np.float32)
        metrics: dict[str, float] = {}
        if cluster is not None:  # a clustered client: its population's block
            blocks = np.zeros((cluster, SIZE), np.float32)
            blocks[index % 2 if night_at else 0] = step
            step, metrics = blocks.reshape(-1), {"cluster": index % 2 if night_at else 0}
        actions = coordinator.handle(
            UpdateReceived(task.client_id, round_number, 1.0, step, 10 + index, metrics)
        )
    return next(a for a in actions if isinstance(a, CommitVersion))


def test_a_flagged_round_splits_the_model_into_its_groups_models() -> None:
    coordinator = engine(split=SplitRule(max_clusters=3))
    assert coordinator.splitting and coordinator.strategy.clusters == 1
    before = coordinator.parameters
    commit = play(coordinator, 1)
    assert commit.summary.drift is not None and commit.summary.drift.bimodal
    split = commit.summary.split
    assert split is not None and (split.round, split.clusters, split.sizes) == (1, 2, (4, 4))
    models = split_models(commit.parameters, clusters=2)
    moved = sorted(np.round(model.vector - before.vector).tolist() for model in models)
    assert moved == [[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]]  # each by its own group's mean
    assert coordinator.parameters is commit.parameters and not coordinator.splitting
    assert isinstance(coordinator.strategy.aggregator, PerCluster)
    assert coordinator.strategy.clusters == 2
    again = play(coordinator, 2)  # per cluster now: no second split
    assert again.summary.split is None and set(again.summary.clusters) == {0, 1}


def test_no_split_without_the_flag_the_drift_or_the_rule() -> None:
    for coordinator, night_at in (
        (engine(split=SplitRule(max_clusters=2)), 0.0),  # one population: never flagged
        (engine(split=SplitRule(max_clusters=2), drift=False), 1.0),  # nothing measures it
        (engine(), 1.0),  # flagged, but the run clusters never (or always)
    ):
        commit = play(coordinator, 1, night_at=night_at)
        assert commit.summary.split is None and stacked_clusters(commit.parameters) is None
        assert coordinator.strategy.clusters == 1


def test_the_strategy_follows_the_layout_of_a_restored_model() -> None:
    coordinator = engine(split=SplitRule(max_clusters=2))
    single = coordinator.parameters
    play(coordinator, 1)
    coordinator.restore(single)  # a rollback across the split
    assert coordinator.strategy.clusters == 1 and coordinator.splitting
    assert play(coordinator, 2).summary.split is not None  # flagged again, split again
    stacked = stack_models([single, single, single])
    coordinator.restore(stacked)
    assert coordinator.strategy.clusters == 3 and not coordinator.splitting
    with pytest.raises(StrategyError, match="layout differs"):
        coordinator.restore(Parameters.from_arrays([np.ones(SIZE + 1)], names=["w"]))
    with pytest.raises(StrategyError, match="layout differs"):  # no split rule: one layout
        engine().restore(stacked)
    with pytest.raises(StrategyError, match="at least 2"):
        SplitRule(max_clusters=1)
