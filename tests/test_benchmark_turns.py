"""The turn-taking of ``benchmarks/simulation.py``: two runs hand a baton back and forth, one
round or a block of rounds each, and never run at once."""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "simulation.py"


@pytest.fixture(scope="module")
def benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("simulation_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _recording(
    name: str, rounds: int, order: list[str], running: list[str]
) -> Callable[[Path, Callable[[], None]], None]:
    lock = threading.Lock()

    def play(folder: Path, round_done: Callable[[], None]) -> None:
        del folder
        for _ in range(rounds):
            with lock:
                running.append(name)
                assert running == [name], f"two runs at once: {running}"
                order.append(name)
                running.remove(name)
            round_done()

    return play


@pytest.mark.parametrize(("every", "expected"), [(1, "ABABABAB"), (3, "AAABBBAAABBBAB")])
def test_runs_take_turns_every_so_many_rounds(
    benchmark: ModuleType, every: int, expected: str
) -> None:
    order: list[str] = []
    running: list[str] = []
    rounds = 4 if every == 1 else 7
    players = [_recording(name, rounds, order, running) for name in "AB"]
    gaps = benchmark._taking_turns(players, every=every)
    assert "".join(order) == expected
    assert [len(g) for g in gaps] == [rounds, rounds]
    assert all(gap >= 0 for g in gaps for gap in g)


def test_a_run_that_fails_hands_the_turn_on_and_its_error_is_raised(
    benchmark: ModuleType,
) -> None:
    order: list[str] = []

    def failing(folder: Path, round_done: Callable[[], None]) -> None:
        del folder
        order.append("A")
        round_done()
        raise RuntimeError("the run broke")

    players = [failing, _recording("B", 5, order, [])]
    with pytest.raises(RuntimeError, match="the run broke"):
        benchmark._taking_turns(players, every=1)
    assert order == ["A", "B", "B", "B", "B", "B"]


def test_turn_pairs_compare_each_turn_with_the_turn_next_to_it(benchmark: ModuleType) -> None:
    # two runs of 6 turns of 2 rounds; the second half's turns 3-5 are compared, turn by turn
    on = [9.0, 9.0, 9.0, 9.0, 2.0, 2.0, 3.0, 3.0, 4.0, 8.0, 5.0, 5.0]
    off = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 4.0, 6.0, 7.0]  # one round more
    ratios = benchmark.turn_pair_ratios(on, off, every=2)
    assert ratios == [3.0 / 2.0, 6.0 / 2.0, 5.0 / 5.0]


def test_the_median_s_interval_holds_it_and_is_the_same_for_the_same_values(
    benchmark: ModuleType,
) -> None:
    ratios = [1.0 + 0.01 * (i % 7) for i in range(60)]
    low, high = benchmark.median_interval(ratios)
    assert low <= 1.03 <= high and high - low < 0.05
    assert benchmark.median_interval(ratios) == (low, high)
    assert benchmark.median_interval([1.2] * 5) == (1.2, 1.2)


def test_a_control_pairs_runs_in_the_same_state_and_the_real_pairing_does_not(
    benchmark: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    states: list[tuple[bool, bool]] = []
    made: list[bool] = []

    def config(path: Path, *, rounds: int, enabled: bool, in_process: bool) -> bool:
        made.append(enabled)
        return enabled

    def turns(players: list[object], *, every: int) -> list[list[float]]:
        states.append((made[-2], made[-1]))
        return [[1.0] * 40, [1.0] * 40]

    monkeypatch.setattr(benchmark, "_telemetry_config", config)
    monkeypatch.setattr(benchmark, "simulation_rounds", lambda config: config)
    monkeypatch.setattr(benchmark, "_taking_turns", turns)
    benchmark.telemetry_ratio(Path("w.toml"), rounds=40, repeats=4, in_process=False)
    assert states == [(True, False), (False, True), (True, False), (False, True)]
    states.clear()
    *_, control_turns = benchmark.telemetry_ratio(
        Path("w.toml"), rounds=40, repeats=4, in_process=False, control=True
    )
    assert states == [(False, False), (False, False), (True, True), (True, True)]
    assert set(control_turns) == {1.0}


@pytest.fixture(scope="module")
def telemetry_cost() -> ModuleType:
    path = BENCHMARK.with_name("telemetry_cost.py")
    spec = importlib.util.spec_from_file_location("telemetry_cost_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pooled_interval_widens_with_the_spread_between_invocations(
    telemetry_cost: ModuleType,
) -> None:
    # the same values, spread inside each invocation or between invocations: pooled, both
    # have one median, and the interval that draws the invocations too is the wider
    within = [[1.0, 1.02, 1.04, 1.06, 1.08] for _ in range(6)]
    between = [[1.0 + 0.02 * i] * 5 for i in range(5)] + [[1.04] * 5]
    low_within, high_within = telemetry_cost.pooled_interval(within)
    low_between, high_between = telemetry_cost.pooled_interval(between)
    assert low_within <= 1.04 <= high_within and low_between <= 1.04 <= high_between
    assert high_between - low_between > high_within - low_within
    assert telemetry_cost.pooled_interval(within) == (low_within, high_within)  # seeded
    assert telemetry_cost.pooled_interval([[1.1] * 3, [], [1.1]]) == (1.1, 1.1)
    with pytest.raises(ValueError, match="no ratios"):
        telemetry_cost.pooled_interval([[], []])
