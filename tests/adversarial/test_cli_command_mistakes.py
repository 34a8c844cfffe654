"""Every ``shoal`` command's obvious mistakes: a clear error and the right exit code, never a
traceback (one test per class of mistake).

Found on the code before: a version number or a count past 64 bits was an
``OverflowError`` from SQLite in every registry command; ``--days 999999999``
overflowed the calendar; a corrupt ``enrollment.json`` was a JSON traceback;
``--resume --rounds 99999999999999999999`` ran forever; ``demo network
--port 99999`` served on port 34463; ``client run --num-partitions`` built a
population of any size.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest
from typer.testing import Result

from support.user_errors import EXIT_CONFIG, EXIT_ENVIRONMENT, invoke, one_line_error

HUGE = "99999999999999999999"  # past 2**64


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-round simulation: its registry holds model ``global``, version 0 and 1."""
    folder = tmp_path_factory.mktemp("run") / "run"
    result = invoke(
        "simulate", "-q", "--rounds", "1", "--out", folder, "--set", "data.num_clients=6",
        "--set", "round.clients_per_round=3", "--set", "evaluation.every=0",
        "--set", "simulation.workers=0", "--set", "round.deadline_s=600",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder


def usage_error(result: Result, option: str) -> None:
    """A mistake in an option or argument: typer's usage message (exit 2) naming it."""
    raised = result.exception
    assert raised is None or isinstance(raised, SystemExit), repr(raised)
    assert result.exit_code == EXIT_CONFIG, result.stderr
    assert option in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["models", "show", "global", HUGE], "VERSION"),
        (["models", "mark", "global", HUGE, "bad", "--reason", "x"], "VERSION"),
        (["models", "rollback", "global", HUGE, "--yes"], "VERSION"),
        (["models", "export", "global", HUGE, "--format", "npz", "--out", "m.npz"], HUGE),
        (["clients", "list", "--limit", HUGE], "--limit"),
        (["clients", "enroll", "--uses", HUGE], "--uses"),
    ],
)
def test_a_registry_number_past_its_range_is_a_usage_error(
    run_folder: Path, args: list[str], option: str
) -> None:
    usage_error(invoke(*args, "--state-dir", run_folder), option)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["certs", "init", "--out", "certs", "--days", "999999999"], "--days"),
        (["demo", "network", "--port", "99999"], "--port"),
        (["keyholder", "silo-keys", "--out", "keys.json", "--simulated", "10000000"],
         "--simulated"),
        (["client", "run", "--coordinator", "127.0.0.1:1", "--state-dir", "client", "--insecure",
          "--partition-index", "0", "--num-partitions", "2000000"], "--num-partitions"),
        # gRPC took 99999 as port 34463, and retried a portless address forever, silently
        (["client", "run", "--coordinator", "127.0.0.1:99999", "--state-dir", "client",
          "--insecure"], "--coordinator"),
        (["client", "run", "--coordinator", "nonsense", "--state-dir", "client", "--insecure"],
         "--coordinator"),
        (["client", "run", "--coordinator", "127.0.0.1:0", "--state-dir", "client", "--insecure"],
         "--coordinator"),
    ],
)  # fmt: skip
def test_a_number_past_what_a_command_can_do_is_a_usage_error(args: list[str], option: str) -> None:
    usage_error(invoke(*args), option)
    assert not Path("certs").exists() and not Path("client").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["models", "show", "global", "7"], "model 'global' has no version 7"),
        (["models", "show", "no-such-model", "0"], "model 'no-such-model' has no version 0"),
        (["models", "export", "no-such-model", "head", "--format", "npz", "--out", "m.npz"],
         "no model named 'no-such-model' in the registry"),
        (["clients", "show", "nobody"], "no client 'nobody' is enrolled"),
    ],
)  # fmt: skip
def test_a_wrong_model_name_or_version_is_one_line(
    run_folder: Path, args: list[str], expected: str
) -> None:
    result = invoke(*args, "--state-dir", run_folder)
    one_line_error(result, code=EXIT_ENVIRONMENT, contains=(expected,))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.kind=cnn", "model.kind: Input should be 'softmax' or 'mlp', got 'cnn'"),
        ("strategy.name=fedavgg", "strategy.name: unknown strategy 'fedavgg'"),
        ("round.clients_per_rund=5", "did you mean clients_per_round?"),
        ("nokey", "--set expects section.key=value, got 'nokey'"),
        ("run.rounds=many", "run.rounds: Input should be a valid integer"),
    ],
)
@pytest.mark.parametrize("command", ["simulate", "coordinator serve"])
def test_a_bad_set_is_one_config_line(command: str, override: str, expected: str) -> None:
    words = ["simulate"] if command == "simulate" else ["coordinator", "serve", "--config"]
    if command != "simulate":
        Path("job.toml").write_text("")
        words.append("job.toml")
    result = invoke(*words, "--set", override)
    one_line_error(result, code=EXIT_CONFIG, contains=(expected,))


def test_resume_with_a_run_length_past_its_limit_is_one_line(run_folder: Path) -> None:
    """It used to start a run of 10^20 rounds."""
    result = invoke("simulate", "--resume", run_folder, "--rounds", HUGE)
    one_line_error(result, code=EXIT_CONFIG, contains=(f"run.rounds = {HUGE} is above the limit",))


def test_a_corrupt_enrollment_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "enrollment.json").write_text('{"client_id": "a", "private_')
    result = invoke(
        "client", "run", "--coordinator", "127.0.0.1:1", "--state-dir", tmp_path / "client",
        "--insecure", "--partition-index", "0",
    )  # fmt: skip
    one_line_error(
        result,
        code=EXIT_ENVIRONMENT,
        contains=("enrollment.json is not a readable enrollment (JSONDecodeError",),
    )


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("torch", ["models", "export", "global", "head", "--format", "torch", "--out", "m.pt"],
         "shoal[torch]"),
        ("ray", ["simulate", "--rounds", "1", "--out", "run", "--set", "data.num_clients=6",
                 "--set", "round.clients_per_round=3", "--set", "simulation.backend=ray"],
         "shoal[ray]"),
    ],
)  # fmt: skip
def test_a_missing_extra_is_one_line_naming_it(
    run_folder: Path, monkeypatch: pytest.MonkeyPatch, module: str, args: list[str], extra: str
) -> None:
    for name in [name for name in sys.modules if name == module or name.startswith(f"{module}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import torch` now fails, as uninstalled
    if args[0] == "models":
        args = [*args, "--state-dir", str(run_folder)]
    one_line_error(invoke(*args), code=EXIT_ENVIRONMENT, contains=(extra,))
    assert not Path("m.pt").exists()


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', "null"])
def test_resuming_a_folder_whose_config_is_not_a_table_is_one_line(
    run_folder: Path, tmp_path: Path, text: str
) -> None:
    """JSON, but not a config: a TypeError or ValueError from inside the parser before."""
    copy = tmp_path / "run"
    shutil.copytree(run_folder, copy)
    (copy / "config.json").write_text(text)
    result = invoke("simulate", "--resume", copy, "--rounds", "2")
    one_line_error(result, code=EXIT_CONFIG, contains=("a config is a table of sections",))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", "run.rounds: Input should be a valid integer"),
        ("1.5", "run.rounds: Input should be a valid integer"),
        ("0", "run.rounds: Input should be greater than or equal to 1"),
        (HUGE, f"run.rounds = {HUGE} is above the limit"),
    ],
)
def test_resume_parses_its_run_rounds_as_any_set_is_parsed(
    run_folder: Path, value: str, expected: str
) -> None:
    """``--set run.rounds=abc`` on a resume was a ValueError traceback from int()."""
    result = invoke("simulate", "--resume", run_folder, "--set", f"run.rounds={value}")
    one_line_error(result, code=EXIT_CONFIG, contains=(expected,))


@pytest.mark.parametrize("metrics", ["[1]", "not json", '"text"', "null"])
def test_a_registry_version_whose_metrics_are_not_an_object_is_one_line(
    run_folder: Path, tmp_path: Path, metrics: str
) -> None:
    """``models list``, a resume (and the dashboard) read HEAD: a TypeError or a
    JSONDecodeError traceback from every one of them."""
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_folder, corrupt)
    with closing(sqlite3.connect(corrupt / "registry" / "registry.db")) as database:
        database.execute("update model_versions set metrics = ?", (metrics,))
        database.commit()
    expected = ("model 'global' version ", "its metrics are not a JSON object")
    for args in (["models", "list", "--state-dir", corrupt], ["simulate", "--resume", corrupt]):
        one_line_error(invoke(*args), code=EXIT_ENVIRONMENT, contains=expected)
