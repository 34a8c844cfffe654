"""A robust strategy in the config is checked against the fewest updates a round closes with.

A round commits with as few updates as its quorum of ``clients_per_round``:
Krum refuses fewer than 2f + m + 3 only after every client trained, and a
median or trimmed mean over too few updates is a plain mean. The config
refuses such a job before anything runs; a server app's own strategy is its
app's business.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shoal.aggregation.aggregators import CoordinateMedian, TrimmedMean, trimmed_mean
from shoal.aggregation.strategy import fewest_updates, make_strategy
from shoal.config import Config, apply_overrides, parse_config
from shoal.coordinator.app import ServerApp
from shoal.coordinator.rounds import RoundSettings
from shoal.coordinator.setup import strategy_for
from shoal.core.errors import ConfigError, StrategyError
from shoal.tasks import Phase


def job(*overrides: str) -> Config:
    """Every section's defaults (10 clients a round, quorum 0.8) with ``overrides``."""
    return parse_config(apply_overrides({}, ["data.num_clients=40", *overrides]))


def refusal(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        job(*overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_krum_with_a_cohort_too_small_for_its_bound_is_refused_naming_the_numbers() -> None:
    """The csv-per-client job (five sites, quorum 0.8) with Krum: every round trained, then
    aborted; now the config says what to change."""
    message = refusal(
        "data.num_clients=5", "round.clients_per_round=5", "round.over_selection=1.0",
        "strategy.name='krum'",
    )  # fmt: skip
    assert "strategy 'krum' needs at least 6 updates a round" in message
    assert "2f + 2 < n - m, with f = 1 and m = 1" in message
    assert "a round may close with 4 (round.quorum = 0.8 of round.clients_per_round = 5)" in message
    assert "lower strategy.num_byzantine (f = 0 fits)" in message


def test_multi_krum_names_both_of_its_settings() -> None:
    """The digits-multikrum example's settings: rounds that close with 16 of 20 would abort."""
    message = refusal(
        "round.clients_per_round=20", "strategy.name='multikrum'", "strategy.num_byzantine=2",
        "strategy.num_selected=10",
    )  # fmt: skip
    assert "needs at least 17 updates a round" in message
    assert "with f = 2 and m = 10" in message and "a round may close with 16" in message
    assert "strategy.num_byzantine or strategy.num_selected (f = 1 or m = 9 fits)" in message


def test_a_krum_aggregator_on_another_preset_is_checked_too() -> None:
    message = refusal("round.clients_per_round=3", "strategy.aggregator='krum'")
    assert message.startswith("config: strategy 'fedavg+krum' needs at least 6 updates")
    assert "fits" not in message  # no f fits 3 updates: only a larger round does


@pytest.mark.parametrize(
    ("clients_per_round", "quorum", "strategy", "fewest"),
    [
        (6, 1.0, ["name='krum'"], 6),
        (8, 0.8, ["name='multikrum'"], 6),  # m = auto: 1 at the least
        (10, 1.0, ["name='fedtrimmedavg'"], 10),
        (8, 1.0, ["name='fedtrimmedavg'", "trim_ratio=0.125"], 8),
        (3, 1.0, ["name='fedmedian'"], 3),
        (2, 0.8, ["name='fedtrimmedavg'", "trim_ratio=0"], 1),  # asked for a plain mean
    ],
)
def test_a_round_that_closes_with_enough_updates_is_accepted(
    clients_per_round: int, quorum: float, strategy: list[str], fewest: int
) -> None:
    config = job(
        f"round.clients_per_round={clients_per_round}",
        f"round.quorum={quorum}",
        *(f"strategy.{option}" for option in strategy),
    )
    built = make_strategy(config.strategy.name, **config.strategy.model_dump(exclude={"name"}))
    assert fewest_updates(built.aggregator) == fewest


def test_a_trimmed_mean_that_trims_nothing_in_the_smallest_round_is_refused() -> None:
    """0.1 of the 8 updates a default round may close with is 0: a plain mean."""
    message = refusal("strategy.name='fedtrimmedavg'")
    assert "strategy 'fedtrimmedavg' needs at least 10 updates a round" in message
    assert "to trim one from each side at trim_ratio = 0.1" in message
    assert "a round may close with 8" in message
    assert "or raise strategy.trim_ratio to 1/8 or more" in message
    assert trimmed_mean([np.zeros(1, np.float32)] * 8, trim_ratio=1 / 8).size == 1


def test_a_median_of_two_updates_is_refused() -> None:
    message = refusal("round.clients_per_round=2", "strategy.name='fedmedian'")
    assert "strategy 'fedmedian' needs at least 3 updates a round" in message
    assert "a round may close with 2 (round.quorum = 0.8 of round.clients_per_round = 2)" in message


def test_secure_aggregation_and_dp_keep_their_own_refusal_of_robust_rules() -> None:
    """Both refuse every rule but the mean when the coordinator is built: the cohort is not
    what to change there."""
    small = ["round.clients_per_round=3", "strategy.name='krum'"]
    assert job(*small, "secure_aggregation.protocol='secagg+'")
    assert job(*small, "privacy.placement='central'", "privacy.epsilon=1")


def test_an_option_the_rule_does_not_take_is_left_to_the_strategy_refusal() -> None:
    config = job("round.clients_per_round=3", "strategy.trim_ratio=0.2")
    with pytest.raises(StrategyError, match="does not take trim_ratio"):
        make_strategy(config.strategy.name, **config.strategy.model_dump(exclude={"name"}))


def test_a_server_apps_own_strategy_is_not_the_configs_to_refuse() -> None:
    """An app that composes Krum itself runs under a config whose [strategy] is the default."""
    config = parse_config({"data": {"num_clients": 8}, "round": {"clients_per_round": 8}})
    own = make_strategy("krum", num_byzantine=1)
    assert strategy_for(config, ServerApp(strategy=own)) is own


@settings(max_examples=200, deadline=None)
@given(
    clients_per_round=st.integers(1, 24),
    quorum=st.sampled_from([0.3, 0.5, 0.8, 0.9, 1.0]),
    num_byzantine=st.integers(0, 4),
    rule=st.sampled_from(["krum", "multikrum"]),
    num_selected=st.one_of(st.none(), st.integers(1, 8)),
)
def test_the_config_accepts_krum_exactly_when_its_smallest_round_aggregates(
    clients_per_round: int, quorum: float, num_byzantine: int, rule: str, num_selected: int | None
) -> None:
    """The config's smallest round is the engine's quorum, and its bound Krum's own."""
    assume(rule == "multikrum" or num_selected is None)  # Krum selects one, it takes no m
    options = {"num_byzantine": num_byzantine} | (
        {} if num_selected is None else {"num_selected": num_selected}
    )
    sections = {
        "data": {"num_clients": 24},
        "round": {"clients_per_round": clients_per_round, "quorum": quorum},
        "strategy": {"name": rule, **options},
    }
    settled = RoundSettings(clients_per_round=clients_per_round, quorum=quorum)
    aggregator = make_strategy(rule, **options).aggregator
    state = aggregator.init(num_parameters=2)
    for index in range(settled.quorum_count(Phase.FIT)):
        state = aggregator.accumulate(state, np.full(2, index, np.float32), weight=1.0)
    try:
        aggregator.finalize(state)
        aggregates = True
    except StrategyError:
        aggregates = False
    try:
        parse_config(sections)
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == aggregates


@pytest.mark.parametrize("trim_ratio", [0.01, 0.1, 0.125, 0.2, 0.3, 1 / 3, 0.45, 0.49])
def test_a_trimmed_means_fewest_updates_are_the_fewest_it_trims_one_from(
    trim_ratio: float,
) -> None:
    fewest = TrimmedMean(trim_ratio=trim_ratio).fewest_updates
    assert np.floor(trim_ratio * fewest) >= 1 and np.floor(trim_ratio * (fewest - 1)) == 0
    assert CoordinateMedian().fewest_updates == 3
