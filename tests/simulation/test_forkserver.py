"""`shoal simulate` starts its pool's forkserver before its own imports, and only when a pool
is coming; a wrong guess costs time, never the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from shoal.cli.app import app
from shoal.config import SimulationSection, default_config_path
from shoal.forkserver import DEFAULT_CONFIG, VALUE_OPTIONS, start_early, wants_pool


def job(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return str(path)


def test_the_default_job_and_a_file_without_a_simulation_section_want_a_pool(
    tmp_path: Path,
) -> None:
    assert wants_pool(["simulate"])
    assert wants_pool(["simulate", "-q", "--rounds", "3", job(tmp_path, "[run]\nrounds = 2\n")])


@pytest.mark.parametrize(
    ("text", "extra", "wanted"),
    [
        ("[simulation]\nworkers = 4\n", [], True),
        ("[simulation]\nworkers = 0\n", [], False),
        ("[simulation]\nworkers = 1\n", [], False),
        ('[simulation]\nbackend = "ray"\n', [], False),
        ("[simulation]\nworkers = 4\n", ["--set", "simulation.workers=0"], False),
        ("[simulation]\nworkers = 4\n", ["--set=simulation.backend=ray"], False),
        ("[simulation]\nworkers = 4\n", ["--set", "run.rounds=2"], True),
        ("not toml [", [], False),
        ("[simulation]\nworkers = 4\n# \udce9\n", [], False),  # not UTF-8: no guess, no error
        ("[simulation]\nworkers = 4\n" + "#" * (1 << 20), [], False),  # too long to read ahead
        ('simulation = "text"\n', [], False),
    ],
)
def test_the_config_and_its_overrides_decide(
    tmp_path: Path, text: str, extra: list[str], wanted: bool
) -> None:
    assert wants_pool(["simulate", job(tmp_path, text), *extra]) is wanted


def test_an_option_value_is_not_taken_for_the_config(tmp_path: Path) -> None:
    config = job(tmp_path, "[simulation]\nworkers = 0\n")
    # the config comes after --out's value and --seed's; "run" is --out's value, not a file
    assert not wants_pool(["simulate", "--out", "run", "--seed=3", config])


def test_a_resume_or_another_command_or_program_starts_nothing(tmp_path: Path) -> None:
    assert not wants_pool(["simulate", "--resume", str(tmp_path)])
    assert not wants_pool(["simulate", "--help"])  # the default job wants a pool; help does not
    assert not wants_pool(["coordinator", "serve"])
    assert not wants_pool([])
    assert not start_early(["pytest", "simulate"])  # not the shoal command
    assert not start_early([])


def test_the_guess_reads_the_commands_own_options_and_defaults() -> None:
    simulate = typer.main.get_command(app).commands["simulate"]  # type: ignore[attr-defined]
    taking_values = {
        name
        for parameter in simulate.params
        if parameter.param_type_name == "option"
        and not getattr(parameter, "is_flag", False)
        and not getattr(parameter, "count", False)
        for name in parameter.opts
    }
    assert taking_values == VALUE_OPTIONS
    assert default_config_path() == DEFAULT_CONFIG
    assert SimulationSection().workers == 2 and SimulationSection().backend == "local"


@pytest.mark.slow
def test_the_command_starts_the_server_and_its_pool_forks_from_it(tmp_path: Path) -> None:
    config = job(
        tmp_path,
        "[run]\nrounds = 2\n[data]\nnum_clients = 6\n[round]\nclients_per_round = 3\n"
        "[simulation]\nworkers = 2\n",
    )
    probe = (
        "import sys\n"
        f"sys.argv = ['shoal', 'simulate', {config!r}]\n"
        "import shoal.cli\n"
        "from multiprocessing import forkserver\n"
        "started = forkserver._forkserver._forkserver_pid\n"  # the server this process started
        "from shoal.config import load_config\n"
        "from shoal.simulation.runner import Simulation\n"
        f"summary = Simulation(load_config({config!r}), {str(tmp_path / 'run')!r}).run()\n"
        "import json\n"
        "print(json.dumps({'started': started is not None,\n"
        "  'same': forkserver._forkserver._forkserver_pid == started,\n"
        "  'rounds': summary['rounds_completed']}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "started": True,
        "same": True,
        "rounds": 2,
    }


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["script", "module"])
def test_a_pooled_simulation_runs_from_the_shoal_script_and_from_python_m(
    tmp_path: Path, launcher: str
) -> None:
    """A worker runs the ``shoal`` script again as ``__mp_main__``, with the command's argv:
    it must not start a server of its own (it would raise, and the pool would break)."""
    config = job(
        tmp_path,
        "[run]\nrounds = 2\n[data]\nnum_clients = 6\n[round]\nclients_per_round = 3\n"
        "[simulation]\nworkers = 2\n",
    )
    script = Path(sys.executable).with_name("shoal")
    if launcher == "script" and not script.is_file():
        pytest.skip("the shoal script is not installed beside this Python")
    program = [str(script)] if launcher == "script" else [sys.executable, "-m", "shoal"]
    result = subprocess.run(
        [*program, "simulate", config, "-q", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
