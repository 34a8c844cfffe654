"""Running ``shoal`` as a user does, and checking that a mistake is one line: the exit code,
a single line on stderr, and no traceback anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner, Result

import shoal
from shoal.cli import app

SOURCE = str(Path(shoal.__file__).resolve().parents[1])
EXIT_CONFIG = 2  # a mistake in the configuration or the command line
EXIT_ENVIRONMENT = 1  # the machine refused: a port, a folder, a file


def invoke(*args: str | Path) -> Result:
    """``shoal ARGS`` in this process (typer's runner), stdout and stderr apart."""
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(arg) for arg in args])


def run_shoal(
    *args: str | Path, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m shoal ARGS`` in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "shoal", *(str(arg) for arg in args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": SOURCE, "COLUMNS": "200"},
        check=False,
    )


def one_line_error(
    result: Result | subprocess.CompletedProcess[str], *, code: int, contains: tuple[str, ...] = ()
) -> str:
    """The one line ``result`` printed on stderr, after checking its exit code and that no
    traceback (printed, or raised inside the runner) came with it."""
    if not isinstance(result, subprocess.CompletedProcess):  # the runner's Result
        raised = result.exception
        assert raised is None or isinstance(raised, SystemExit), repr(raised)
        returncode = result.exit_code
    else:
        returncode = result.returncode
    stdout, stderr = result.stdout, result.stderr
    assert "Traceback" not in stdout + stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert returncode == code, (returncode, stderr)
    for fragment in contains:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
