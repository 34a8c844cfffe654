"""How a batch of jobs is shared between the processes of a pool: in proportion to how fast each
did its jobs lately.

A pool's processes are not equally fast at a batch: a worker also unpickles its chunk, pickles
the outcomes back and waits for the pipe both ways, and the cores themselves differ (a
hypervisor's two vCPUs, a laptop's performance and efficiency cores). With even chunks the
round waits for the slowest: at 1,000 clients and 100 a round, the coordinator's process
trained its 50 in 11.5 ms and then waited 2.4 ms for the worker's. :class:`Balance` times each
process's last chunks (seconds per job, smoothed) and sizes the next chunks so that each
takes about as long.

>>> balance = Balance(2)
>>> balance.sizes(10) is None  # even chunks until every process was timed
True
>>> balance.observe(0, jobs=5, seconds=0.010)
>>> balance.observe(1, jobs=5, seconds=0.015)
>>> balance.sizes(10)
[6, 4]

A batch started ahead (:meth:`shoal.simulation.executor.ProcessExecutor.start`) finds the first
process, the coordinator's, busy with other work for a while before it trains its chunk (the
last round's records, committing): its chunk is then sized to end with the others', counting
that head start (the median of the last :data:`BUSY_WINDOW` times it was busy,
:meth:`Balance.observe_busy`: one long pause, such as a caller that waited in its
``on_round`` callback, says nothing of the next round's commit).

>>> balance.observe_busy(0.012)  # busy 12 ms, then 4 jobs of 2 ms; the other 6 of 3 ms
>>> balance.sizes(10, ahead=True)
[4, 6]
"""

from __future__ import annotations

import collections
import statistics

SMOOTHING = 0.3
"""The weight of a chunk's timing against the ones before it: one slow chunk (the machine busy
for a moment) moves the shares a little, a process that stays slower moves them within a few
batches."""
BUSY_WINDOW = 5
"""How many of the first process's latest busy times its head start is the median of."""


class Balance:
    """Each of ``processes`` processes' seconds per job, and the chunk sizes they call for."""

    def __init__(self, processes: int, *, smoothing: float = SMOOTHING) -> None:
        if processes < 1:
            raise ValueError(f"a pool has at least one process, got {processes}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self._seconds_per_job: list[float | None] = [None] * processes
        self._busy_s: collections.deque[float] = collections.deque(maxlen=BUSY_WINDOW)

    @property
    def seconds_per_job(self) -> tuple[float | None, ...]:
        return tuple(self._seconds_per_job)

    def observe(self, process: int, *, jobs: int, seconds: float) -> None:
        """Process ``process`` did ``jobs`` jobs in ``seconds`` (no jobs: nothing learned)."""
        if jobs <= 0 or not seconds >= 0:
            return
        latest = max(seconds, 1e-9) / jobs
        before = self._seconds_per_job[process]
        self._seconds_per_job[process] = (
            latest if before is None else before + self.smoothing * (latest - before)
        )

    @property
    def busy(self) -> float:
        """The seconds the first process spends on other work before it trains its chunk of a
        batch started ahead: the median of its latest (the lower of the two middle ones; 0
        until one was started)."""
        return statistics.median_low(self._busy_s) if self._busy_s else 0.0

    def observe_busy(self, seconds: float) -> None:
        """The first process turned to its chunk of a batch started ahead ``seconds`` after
        the batch started."""
        if seconds >= 0:
            self._busy_s.append(seconds)

    def sizes(self, count: int, *, ahead: bool = False) -> list[int] | None:
        """How many of ``count`` jobs each process gets, in proportion to its speed, at least
        one each while there are enough (so that each is timed again); None until every
        process was timed (even chunks). ``ahead``: the first process starts on its chunk
        only after its other work (:attr:`busy`), and its chunk is sized so that it ends
        with the others'."""
        timed = self._seconds_per_job
        if any(seconds is None for seconds in timed):
            return None
        speeds = [1.0 / seconds for seconds in timed if seconds is not None]
        exact = _shares(count, speeds, head_start=self.busy if ahead else 0.0)
        sizes = [int(share) for share in exact]
        # the jobs left by rounding down go to the largest remainders, the first of equal ones
        by_remainder = sorted(range(len(exact)), key=lambda i: sizes[i] - exact[i])
        for index in by_remainder[: count - sum(sizes)]:
            sizes[index] += 1
        if count >= len(sizes):  # one each, from the largest chunk
            for index, size in enumerate(sizes):
                if size == 0:
                    sizes[sizes.index(max(sizes))] -= 1
                    sizes[index] = 1
        return sizes


def _shares(count: int, speeds: list[float], *, head_start: float) -> list[float]:
    """``count`` jobs shared among processes of ``speeds`` (jobs a second) so that all end
    together, the first starting ``head_start`` seconds late (none for it when the others end
    first)."""
    total = sum(speeds)
    end = (count + head_start * speeds[0]) / total  # when all end, the first one included
    if end > head_start or len(speeds) == 1:
        return [max(0.0, end - head_start) * speeds[0], *(end * speed for speed in speeds[1:])]
    others = total - speeds[0]
    return [0.0, *(count * speed / others for speed in speeds[1:])]
