"""Alert hooks: logged always, commands fed JSON and killed on time, Python targets, isolation."""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from shoal.core import ConfigError, ProtocolError
from shoal.telemetry import (
    AlertHook,
    BudgetExhausted,
    CohortDropped,
    CommandHook,
    LoggingHook,
    PythonHook,
    alert_hooks,
    fire,
)

ALERT = BudgetExhausted(
    run_id="run-7",
    round=12,
    epsilon_spent=8.125,
    epsilon_budget=8.0,
    reason="epsilon budget exhausted after round 12",
)

RECORDER = """\
import json, os, sys
received = {
    "stdin": sys.stdin.read(),
    "env": {k: v for k, v in os.environ.items() if k.startswith("SHOAL_ALERT_")},
}
with open(sys.argv[1], "w") as handle:
    json.dump(received, handle)
"""


def python_command(tmp_path: Path, source: str, *arguments: str) -> str:
    script = tmp_path / f"hook_{uuid.uuid4().hex[:8]}.py"
    script.write_text(source)
    return shlex.join([sys.executable, str(script), *arguments])


def alert_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "shoal.alerts" and record.levelno == logging.ERROR
    ]


def test_the_event_describes_itself() -> None:
    assert ALERT.kind == "budget_exhausted"
    assert ALERT.fields() == {
        "kind": "budget_exhausted",
        "run_id": "run-7",
        "round": 12,
        "epsilon_spent": 8.125,
        "epsilon_budget": 8.0,
        "reason": "epsilon budget exhausted after round 12",
    }
    assert ALERT.summary == (
        "privacy budget of run run-7 exhausted at round 12: epsilon 8.125 spent of 8 "
        "(epsilon budget exhausted after round 12)"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"run_id": ""}, "needs a run id"),
        ({"round": -1}, "round must be an integer >= 0"),
        ({"epsilon_spent": float("nan")}, "epsilon_spent must be a finite number >= 0"),
        ({"epsilon_budget": -1.0}, "epsilon_budget must be a finite number >= 0"),
    ],
)
def test_a_malformed_event_is_refused(change: dict[str, Any], message: str) -> None:
    fields = {key: value for key, value in ALERT.fields().items() if key != "kind"} | change
    with pytest.raises(ProtocolError, match=message):
        BudgetExhausted(**fields)


def test_the_logging_hook_writes_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="shoal.alerts")
    LoggingHook()(ALERT)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("shoal.alerts", logging.WARNING, f"alert budget_exhausted: {ALERT.summary}")
    ]


def test_the_command_hook_gets_json_on_stdin_and_the_environment(tmp_path: Path) -> None:
    received = tmp_path / "received.json"
    CommandHook(python_command(tmp_path, RECORDER, str(received)))(ALERT)
    got = json.loads(received.read_text())
    assert json.loads(got["stdin"]) == ALERT.fields()
    assert got["env"] == {
        "SHOAL_ALERT_KIND": "budget_exhausted",
        "SHOAL_ALERT_RUN_ID": "run-7",
        "SHOAL_ALERT_ROUND": "12",
        "SHOAL_ALERT_EPSILON_SPENT": "8.125",
        "SHOAL_ALERT_EPSILON_BUDGET": "8.0",
        "SHOAL_ALERT_REASON": "epsilon budget exhausted after round 12",
    }


def test_a_failing_command_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = "import sys; print('mail server down'); sys.exit(3)"
    assert fire([CommandHook(python_command(tmp_path, source))], ALERT) == []
    [error] = alert_errors(caplog)
    assert "exited with status 3; output: mail server down" in error


def test_a_missing_command_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    CommandHook(str(tmp_path / "no-such-command"))(ALERT)  # the shell reports 127
    [error] = alert_errors(caplog)
    assert "exited with status 127" in error


def process_is_running(pid: int) -> bool:
    """Alive and not a zombie waiting for a parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_slow_command_is_killed_with_what_it_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "pid"
    command = f"sleep 600 & echo $! > {shlex.quote(str(pid_file))}; echo started; wait"
    CommandHook(command, timeout_s=1.0)(ALERT)
    [error] = alert_errors(caplog)
    assert "timed out after 1s and was killed; output: started" in error
    # SIGKILL is delivered asynchronously: the orphan dies soon after killpg returns
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while process_is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not process_is_running(pid)


def test_a_python_hook_calls_module_colon_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"alert_sink_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "received = []\n\nclass Sink:\n    @staticmethod\n    def take(alert):\n"
        "        received.append(alert)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    hook = PythonHook(f"{name}:Sink.take")
    assert fire([hook], ALERT) == []
    assert sys.modules[name].received == [ALERT]
    monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("json.dumps", "is named 'package.module:function'"),
        (":dumps", "is named 'package.module:function'"),
        ("json:", "is named 'package.module:function'"),
        ("no_such_module_anywhere:f", "cannot import 'no_such_module_anywhere'"),
        ("json:no_such_function", "no 'no_such_function' in it"),
        ("json:__name__", "is not callable"),
    ],
)
def test_a_bad_python_target_is_a_config_error(target: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PythonHook(target)


class Recorder:
    def __init__(self) -> None:
        self.received: list[Any] = []

    def __call__(self, alert: Any) -> None:
        self.received.append(alert)


def test_fire_isolates_a_raising_hook(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_alert: Any) -> None:
        raise RuntimeError("webhook refused")

    before, after = Recorder(), Recorder()
    failures = fire([before, broken, after], ALERT)
    assert [str(failure) for failure in failures] == ["webhook refused"]
    assert before.received == after.received == [ALERT]
    [error] = alert_errors(caplog)
    assert "failed on budget_exhausted: RuntimeError: webhook refused" in error
    # one line: the user's hook failed, not the run (its traceback is kept for debug level)
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is None and "\n" not in record.getMessage()


def test_fire_with_no_hooks_does_nothing() -> None:
    assert fire([], ALERT) == []


def test_the_configured_hooks_start_with_logging_and_fail_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.alerts")
    received = tmp_path / "received.json"
    hooks = alert_hooks(
        commands=[python_command(tmp_path, RECORDER, str(received))],
        functions=["logging:getLogger"],  # raises TypeError: an alert is no logger name
        timeout_s=60,
    )
    assert [type(hook) for hook in hooks] == [LoggingHook, CommandHook, PythonHook]
    assert all(isinstance(hook, AlertHook) for hook in hooks)
    assert [type(hook) for hook in alert_hooks()] == [LoggingHook]
    failures = fire(hooks, ALERT)
    assert [type(failure) for failure in failures] == [TypeError]
    assert json.loads(json.loads(received.read_text())["stdin"])["run_id"] == "run-7"
    levels = [record.levelno for record in caplog.records if record.name == "shoal.alerts"]
    assert levels == [logging.WARNING, logging.ERROR]


@pytest.mark.parametrize(
    ("command", "timeout_s", "message"),
    [
        ("", 1.0, "must not be empty"),
        ("   ", 1.0, "must not be empty"),
        ("true", 0.0, "timeout_s must be > 0"),
        ("true", float("inf"), "timeout_s must be > 0"),
    ],
)
def test_a_bad_command_hook_is_a_config_error(command: str, timeout_s: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CommandHook(command, timeout_s=timeout_s)


# --- a cohort that dropped -------------------------------------------------------------------


def cohort_dropped(**changes: Any) -> CohortDropped:
    fields: dict[str, Any] = {
        "run_id": "run-7",
        "round": 3,
        "phase": "fit",
        "fallback": "reselect",
        "configured": "reselect",
        "dropped": 7,
        "cohort": 13,
        "replacements": 9,
        "committed": True,
    }
    return CohortDropped(**(fields | changes))


def test_a_cohort_drop_describes_itself_and_what_the_round_did() -> None:
    alert = cohort_dropped()
    assert alert.kind == "cohort_dropped"
    assert alert.summary == (
        "7 of 13 clients had dropped in round 3 (fit) of run run-7 when the fallback took "
        "over: 9 replacements asked; "
        "the round was committed"
    )
    assert alert.fields()["kind"] == "cohort_dropped" and alert.fields()["replacements"] == 9
    extended = cohort_dropped(fallback="extend", extended_by_s=30.0, committed=False)
    assert "deadline extended by 30s; the round was not committed" in extended.summary
    aborted = cohort_dropped(fallback="abort", configured="extend", note="secure")
    assert "round aborted, model kept (secure)" in aborted.summary


def test_a_cohort_drop_reaches_a_command_as_json_and_environment(tmp_path: Path) -> None:
    received = tmp_path / "received.json"
    CommandHook(python_command(tmp_path, RECORDER, str(received)))(cohort_dropped())
    got = json.loads(received.read_text())
    assert json.loads(got["stdin"])["fallback"] == "reselect"
    assert got["env"]["SHOAL_ALERT_KIND"] == "cohort_dropped"
    assert got["env"]["SHOAL_ALERT_DROPPED"] == "7"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"run_id": ""}, "run id"),
        ({"round": -1}, "round"),
        ({"dropped": 1.5}, "dropped"),
        ({"cohort": True}, "cohort"),
        ({"replacements": -2}, "replacements"),
        ({"extended_by_s": float("inf")}, "extended_by_s"),
    ],
)
def test_a_malformed_cohort_drop_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        cohort_dropped(**changes)
