"""``Database.hold``: a name one process holds in a registry, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shoal.core.errors import RunError
from shoal.registry.database import Database, open_database

IN_USE = "is in use by another shoal process"

# holds argv[2] in the registry at argv[1], says so, then waits to be killed
HOLDER = textwrap.dedent(
    """
    import sys, time
    from shoal.registry.database import open_database
    database = open_database(sys.argv[1])
    held = database.hold(sys.argv[2], what="the name")
    print("held", flush=True)
    time.sleep(600)
    """
)


def test_a_held_name_is_refused_to_another_holder_until_it_is_released(
    database: Database, database_url: str
) -> None:
    other = open_database(database_url)
    try:
        held = database.hold("model/digits", what="model 'digits'")
        with pytest.raises(RunError, match=f"model 'digits' {IN_USE}"):
            other.hold("model/digits", what="model 'digits'")
        other.hold("model/another", what="model 'another'").release()  # names are apart
        held.release()
        held.release()  # twice: a no-op
        again = other.hold("model/digits", what="model 'digits'")
        assert again.held
        again.release()
        assert not again.held
    finally:
        other.close()


def test_the_hold_of_a_killed_process_is_let_go(database: Database, database_url: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, database_url, "model/digits"],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "held"
            with pytest.raises(RunError, match=IN_USE) as refused:
                database.hold("model/digits", what="model 'digits'")
            if database.dialect == "postgresql":
                assert "PostgreSQL backend" in str(refused.value)  # who holds it
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            for _ in range(100):  # the server notices the dropped connection in its own time
                try:
                    database.hold("model/digits", what="model 'digits'").release()
                    break
                except RunError:
                    time.sleep(0.1)
            else:
                pytest.fail("the killed process's hold was never let go")
        finally:
            if child.poll() is None:
                child.kill()
