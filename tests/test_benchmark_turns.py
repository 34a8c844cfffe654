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
