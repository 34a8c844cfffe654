"""A small real simulation for viewer tests, and a way to play it one round at a time."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

from shoal.config import Config, parse_config
from shoal.simulation.runner import Simulation

RUN_NAME = "live-<b>run<i>&amp;"  # markup in a name the pages must escape (no "/": a folder)
CLASSES = ("steady", "budget")


def small_job(*, rounds: int, private: bool = False) -> Config:
    """Digits on 8 steady clients of two device classes, 4 a round, evaluated every round."""
    data: dict[str, Any] = {
        "run": {"name": RUN_NAME, "rounds": rounds, "seed": 0},
        "data": {"num_clients": 8},
        "round": {"clients_per_round": 4, "over_selection": 1.0, "quorum": 0.5},
        "client": {"epochs": 1, "batch_size": 16, "learning_rate": 0.2},
        "evaluation": {"every": 1, "clients": 4},
        "devices": {"classes": [{"name": name, "share": 0.5, "dropout": 0.0} for name in CLASSES]},
        "simulation": {"workers": 0},
    }
    if private:
        data["privacy"] = {
            "placement": "central",
            "noise_multiplier": 1.0,
            "secure_noise": False,
            "epsilon": 50.0,
        }
    return parse_config(data)


class SteppedRun:
    """A simulation in a thread that waits after each round until :meth:`step` lets it go on.

    ``closed`` receives the round number of each round once its rows are written.
    """

    def __init__(self, config: Config, folder: Path) -> None:
        self.simulation = Simulation(config, folder)
        self.closed: queue.Queue[int] = queue.Queue()
        self._go = threading.Semaphore(0)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stepped-run", daemon=True)

    def start(self) -> SteppedRun:
        self._thread.start()
        return self

    def next_round(self, *, timeout: float = 60.0) -> int:
        """Wait for the next round to close; returns its number."""
        try:
            return self.closed.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no round closed: {self._failure!r}") from None

    def step(self) -> int:
        """Let the run play its next round, and wait until it closes."""
        self._go.release()
        return self.next_round()

    def finish(self) -> None:
        """Let every remaining round play, and wait for the run to end."""
        for _ in range(self.simulation.config.run.rounds):
            self._go.release()
        self._thread.join(timeout=120)
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            self.simulation.run(on_round=self._pause)
        except BaseException as exc:
            self._failure = exc
            self.closed.put(-1)

    def _pause(self, row: dict[str, Any]) -> None:
        if row["phase"] == "evaluate":  # the round's last row
            self.closed.put(int(row["round"]))
            self._go.acquire()
