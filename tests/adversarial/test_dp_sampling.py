"""DP that matches what runs: the cohort the accountant assumes is the cohort the engine draws.

Each test drives the run layer and the round engine that both shells share
(:class:`Run.admit`, then ``StartRound``), with the real accountant, ledger
and sampler: a Poisson cohort's size is Binomial(population, q) with the
accountant's q, the DP mean divides by q * population, and under DP the
cohort comes from the CSPRNG, so whoever knows ``run.seed`` cannot predict
it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from shoal.aggregation.strategy import make_strategy
from shoal.client.api import Client
from shoal.config import Config, parse_config
from shoal.coordinator.app import ServerApp
from shoal.coordinator.events import (
    CommitVersion,
    DeadlineReached,
    RoundClosed,
    SendFitTask,
    StartRound,
    UpdateReceived,
)
from shoal.coordinator.records import RunRecords
from shoal.coordinator.run import Run, RunParts
from shoal.coordinator.schedule import Play
from shoal.coordinator.selection import (
    PrivateSampler,
    Stream,
    cohort_size,
    select_cohort,
)
from shoal.coordinator.setup import round_settings_from_config, run_privacy
from shoal.core import Parameters
from shoal.registry import ClientRegistry
from shoal.simulation.runner import open_run_models
from shoal.tasks import Phase

pytestmark = pytest.mark.filterwarnings("ignore::shoal.privacy.noise.InsecureNoiseWarning")

SIZE = 3
SEEDED_WARNING = "DP cohorts are drawn from run.seed"


class Zeros(Client):
    """A client whose model starts at zero (it is asked only for its parameters)."""

    def get_parameters(self) -> Parameters:
        return Parameters.from_arrays([np.zeros(SIZE, np.float32)])

    def fit(self, parameters: Parameters, config: Any) -> Any:
        raise AssertionError("not trained here")

    def evaluate(self, parameters: Parameters, config: Any) -> Any:
        raise AssertionError("not evaluated here")


def private_config(
    *,
    sampling: str,
    secure: bool,
    per_round: int = 10,
    quorum: float = 0.1,
    seed: int = 7,
    **privacy: Any,
) -> Config:
    return parse_config(
        {
            "run": {"rounds": 5000, "seed": seed},
            "data": {"num_clients": 1000},
            "round": {"clients_per_round": per_round, "quorum": quorum},
            "evaluation": {"every": 0},
            "privacy": {
                "placement": "central",
                "noise_multiplier": 1e-6,  # the mean is checked, not the noise
                "delta": 1e-5,
                "clip_norm": 100.0,
                "sampling": sampling,
                "secure_noise": secure,
            }
            | privacy,
        }
    )


@contextmanager
def private_run(folder: Path, config: Config) -> Iterator[Run]:
    """A DP run opened as both shells open theirs: the run layer, its engine, its ledger."""
    models = open_run_models(folder)
    store = RunRecords(folder, models, ClientRegistry(models.database), model="global")
    settings = round_settings_from_config(config)
    run = Run(
        config,
        app=ServerApp(),
        store=store,
        parts=RunParts(settings, make_strategy("fedavg")),
        architecture="tiny",
        privacy=run_privacy(config, settings, run_id="dp"),
    )
    try:
        run.open(Zeros)
        yield run
    finally:
        models.database.close()


def start(run: Run, round_number: int, candidates: list[str]) -> tuple[list[str], list[Any]]:
    """Admit a fit round over ``candidates`` and start it; its cohort and the engine's actions."""
    play = Play(round_number, Phase.FIT)
    admission = run.admit(play, candidates)
    assert admission.wait is None and admission.stop is None
    actions = run.coordinator.handle(
        StartRound(round_number, Phase.FIT, 0.0, admission.candidates, {})
    )
    closed = [a for a in actions if isinstance(a, RoundClosed)]
    if closed:  # below the quorum: closed at once
        return [], actions
    return [a.client_id for a in actions if isinstance(a, SendFitTask)], actions


def abandon(run: Run, round_number: int) -> None:
    """Nobody answers: the deadline closes the round, uncommitted and unaccounted."""
    actions = run.coordinator.handle(DeadlineReached(round_number, 1e6))
    assert any(isinstance(a, RoundClosed) for a in actions)


def cohort_sizes(run: Run, *, rounds: int, population: int) -> np.ndarray:
    candidates = [f"c{index:04d}" for index in range(population)]
    sizes = []
    for round_number in range(1, rounds + 1):
        cohort, actions = start(run, round_number, candidates)
        closed = next((a for a in actions if isinstance(a, RoundClosed)), None)
        sizes.append(closed.summary.selected if closed is not None else len(cohort))
        if closed is None:
            abandon(run, round_number)
    return np.array(sizes)


def test_a_poisson_cohort_is_binomial_with_the_accountants_rate(tmp_path: Path) -> None:
    population, rounds = 200, 1500
    config = private_config(sampling="poisson", secure=True)
    with private_run(tmp_path, config) as run:
        sizes = cohort_sizes(run, rounds=rounds, population=population)
        privacy = run.privacy
        assert privacy is not None
        accounted = privacy.keeper.step_of(rounds)
        sampler = run.coordinator.sampler
        assert isinstance(sampler, PrivateSampler)
    rate = 10 / population
    assert accounted is not None and accounted.sampling_rate == rate  # what the accountant takes
    assert sampler.sampling_rate(population) == rate  # ... is what the sampler draws at
    mean, variance = population * rate, population * rate * (1 - rate)  # Binomial(200, 0.05)
    # five standard errors of the mean (0.08) and about six of the variance (0.35): the
    # old selector drew exactly the cohort size every round (variance 0)
    assert abs(sizes.mean() - mean) < 0.4
    assert abs(sizes.var(ddof=1) - variance) < 2.0


def test_a_seeded_poisson_cohort_passes_a_chi_square_test_against_the_binomial(
    tmp_path: Path,
) -> None:
    population, rounds = 200, 1500
    config = private_config(sampling="poisson", secure=False)
    with private_run(tmp_path, config) as run:
        sizes = cohort_sizes(run, rounds=rounds, population=population)
    binomial = stats.binom(population, 10 / population)
    edges = [0, 6, 8, 9, 10, 11, 12, 14, population + 1]  # cells of at least 5 expected counts
    observed = np.histogram(sizes, bins=edges)[0]
    expected = np.diff(binomial.cdf(np.array(edges) - 1)) * rounds
    assert expected.min() > 5
    assert stats.chisquare(observed, expected).pvalue > 0.001


def updates_from(run: Run, round_number: int, cohort: list[str], value: float) -> CommitVersion:
    actions: list[Any] = []
    for client in cohort:
        update = np.full(SIZE, value, np.float32)
        actions += run.coordinator.handle(UpdateReceived(client, round_number, 1.0, update, 5, {}))
    commit = next(a for a in actions if isinstance(a, CommitVersion))
    summary = next(a for a in actions if isinstance(a, RoundClosed)).summary
    run.record(run.close_round(summary, commit, {}))
    return commit


def test_the_dp_mean_divides_by_the_expected_cohort_not_by_who_arrived(tmp_path: Path) -> None:
    config = private_config(sampling="poisson", secure=False)
    with private_run(tmp_path, config) as run:
        candidates = [f"c{index:03d}" for index in range(100)]  # q = 10 / 100
        round_number, cohort = 0, []
        while len(cohort) in (0, 10):  # a round whose cohort is not the expected size
            if cohort:
                abandon(run, round_number)
            round_number += 1
            cohort, _ = start(run, round_number, candidates)
        commit = updates_from(run, round_number, cohort, 1.0)
        # every sampled client's update is awaited: all of them count, over q * 100 = 10
        assert commit.summary.reported == len(cohort)
        np.testing.assert_allclose(commit.parameters.vector, len(cohort) / 10, rtol=1e-4)

        # fewer eligible than the expected cohort: q = 1, and the mean is over q * 4 = 4
        before = commit.parameters.vector.copy()
        few = ["a", "b", "c", "d"]
        cohort, _ = start(run, round_number + 1, few)
        assert cohort == few
        commit = updates_from(run, round_number + 1, cohort, 1.0)
        np.testing.assert_allclose(commit.parameters.vector - before, 1.0, rtol=1e-4)
        rows = run.store.rows()
    assert [(row["population"], row["sampling_rate"]) for row in rows] == [(100, 0.1), (4, 1.0)]


def first_small_round(run: Run, candidates: list[str], below: int) -> tuple[int, Any]:
    """Play rounds (nobody answers) until a Poisson cohort falls below ``below``."""
    for round_number in range(1, 2001):
        _, actions = start(run, round_number, candidates)
        closed = next((a for a in actions if isinstance(a, RoundClosed)), None)
        if closed is not None:
            return round_number, closed.summary
        abandon(run, round_number)
    raise AssertionError(f"no cohort below {below} in 2,000 rounds")


@pytest.mark.parametrize(("per_round", "quorum", "population"), [(10, 0.5, 100), (1, 1.0, 50)])
def test_an_empty_or_tiny_poisson_cohort_skips_its_round_unaccounted(
    tmp_path: Path, per_round: int, quorum: float, population: int
) -> None:
    config = private_config(sampling="poisson", secure=True, per_round=per_round, quorum=quorum)
    needed = max(1, round(per_round * quorum))
    with private_run(tmp_path, config) as run:
        candidates = [f"c{index:03d}" for index in range(population)]
        round_number, summary = first_small_round(run, candidates, needed)
        row = run.close_round(summary, None, {})
        privacy = run.privacy
        assert privacy is not None
        assert summary.selected < needed and not summary.committed
        assert f"the quorum needs {needed}" in (summary.abort_reason or "")
        assert row["epsilon"] == 0.0  # nothing released, nothing spent
        assert privacy.keeper.accountant.steps == 0
        # the run goes on: the next round starts as usual
        assert run.admit(Play(round_number + 1, Phase.FIT), candidates).wait is None


def predicted_cohorts(seed: int, candidates: list[str], rounds: int, size: int) -> list[list[str]]:
    """What whoever knows ``run.seed`` predicts the coordinator draws (the engine's seeded way)."""
    return [
        list(
            select_cohort(
                candidates, size=size, seed=seed, round_number=r, stream=Stream.SELECT_FIT
            )
        )
        for r in range(1, rounds + 1)
    ]


def drawn_cohorts(folder: Path, config: Config, candidates: list[str], rounds: int) -> list:
    with private_run(folder, config) as run:
        cohorts = []
        for round_number in range(1, rounds + 1):
            cohort, _ = start(run, round_number, candidates)
            cohorts.append(cohort)
            abandon(run, round_number)
    return cohorts


def test_under_dp_the_run_seed_does_not_predict_the_cohort(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    candidates = [f"c{index:03d}" for index in range(100)]
    config = private_config(sampling="fixed", secure=True)
    size = cohort_size(target=10, over_selection=config.round.over_selection)
    first = drawn_cohorts(tmp_path / "one", config, candidates, 5)
    second = drawn_cohorts(tmp_path / "two", config, candidates, 5)
    predicted = predicted_cohorts(config.run.seed, candidates, 5, size)
    assert all(len(cohort) == size for cohort in first + second)
    assert first != second  # two runs with the same seed: two different draws
    assert all(ours != guess for ours, guess in zip(first, predicted, strict=True))
    assert SEEDED_WARNING not in caplog.text


def test_seeded_dp_cohorts_stay_for_simulations_with_a_warning_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    candidates = [f"c{index:03d}" for index in range(100)]
    config = private_config(sampling="fixed", secure=False)
    with caplog.at_level(logging.WARNING, logger="shoal.coordinator"):
        first = drawn_cohorts(tmp_path / "one", config, candidates, 5)
    assert caplog.text.count(SEEDED_WARNING) == 1  # once for the run, not once per round
    second = drawn_cohorts(tmp_path / "two", config, candidates, 5)
    assert first == second  # reproducible


def test_a_restart_keeps_the_plan_the_first_population_made(tmp_path: Path) -> None:
    # delta and a calibrated noise multiplier come from the first round's eligible population;
    # a restart that finds another population keeps the figures the ledger accounted with
    config = private_config(
        sampling="fixed", secure=True, delta=None, noise_multiplier=None, epsilon=50.0
    )
    with private_run(tmp_path, config) as run:
        cohort, _ = start(run, 1, [f"c{index:03d}" for index in range(80)])
        commit = updates_from(run, 1, cohort, 1.0)
        assert commit.summary.committed
        privacy = run.privacy
        assert privacy is not None and privacy.plan is not None
        first, spent = privacy.plan, privacy.keeper.epsilon
    assert first.delta == pytest.approx(1 / 80)
    with private_run(tmp_path, config) as resumed:
        privacy = resumed.privacy
        assert privacy is not None and privacy.plan is not None
        assert (privacy.plan.delta, privacy.plan.noise_multiplier) == (
            first.delta,
            first.noise_multiplier,
        )
        assert privacy.keeper.epsilon == pytest.approx(spent)
        cohort, _ = start(resumed, 2, [f"c{index:03d}" for index in range(300)])
        updates_from(resumed, 2, cohort, 1.0)
        row = resumed.store.rows()[-1]
    assert (row["population"], row["delta"]) == (300, pytest.approx(1 / 80))
    assert row["sampling_rate"] == pytest.approx(13 / 300)  # ceil(10 * 1.3) drawn of 300
