"""The operator's read-only commands against a coordinator that is writing.

Reproduced before the fix: every ``shoal`` command opened the registry as a writer (it
applied the migrations in a write transaction), so on SQLite ``shoal models list``,
``rounds show``, ``audit verify``... took the write lock first: while the coordinator held
it (a round's commit) the read waited for the commit's end, and past the 30 s busy
timeout it failed with "database is locked" although a WAL reader needs no lock. Now a
command that only reads opens the registry read-only: it answers from the last commit at
once, whatever the coordinator is writing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from support.peers import served

HELD_S = 3.0  # the coordinator's write transaction: far longer than any read should wait
READS = [
    ["clients", "list"],
    ["models", "list"],
    ["models", "show", "live", "0"],
    ["audit", "show", "--limit", "5"],
    ["audit", "verify"],
]


@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_a_read_only_command_never_waits_on_the_coordinators_write(
    tmp_path: Path, command: list[str]
) -> None:
    async def read_while_the_coordinator_writes() -> tuple[float, int, str]:
        async with served(tmp_path, run_id="live", tokens=["a-long-enough-token"]) as (_, parts):
            writing, release = threading.Event(), threading.Event()

            def commit() -> None:  # a round's commit, as long as a slow one
                with parts.database.write():
                    writing.set()
                    release.wait(HELD_S)

            writer = threading.Thread(target=commit)
            writer.start()
            writing.wait()
            started = time.monotonic()
            result = CliRunner().invoke(app, [*command, "--state-dir", str(tmp_path / "state")])
            took = time.monotonic() - started
            release.set()
            writer.join()
            return took, result.exit_code, result.output

    took, exit_code, output = asyncio.run(read_while_the_coordinator_writes())
    assert "locked" not in output
    # audit verify on a freshly started coordinator said "TAMPERED: entry 1 unsigned" (its
    # version 0 was committed without a signed head over it, until round 1's commit)
    assert exit_code == 0, output
    assert took < HELD_S / 2, f"{' '.join(command)} waited {took:.2f}s on the coordinator"
