"""Alerts for the people who govern a run: events, the hooks that deliver them, and ``fire``.

An alert is a frozen event that names its ``kind``, says itself in one
line (``summary``) and turns into a flat JSON object (``fields``):
:class:`BudgetExhausted`, raised when a run has spent its
differential-privacy budget and its data lock, :class:`CohortDropped`,
raised when more than the job's share of a round's cohort dropped (with the
fallback the round took), and :class:`ModelRolledBack`, raised when the
poisoned-model playbook marked a version BAD and rolled HEAD back. A hook is any callable that
takes an alert (:class:`AlertHook`). The built-in ones:

- :class:`LoggingHook`: a WARNING line on the ``shoal.alerts`` logger.
  :func:`alert_hooks` always puts it first, so an alert is never silent.
- :class:`CommandHook`: a shell command, given the alert as JSON on its
  standard input and as ``SHOAL_ALERT_*`` environment variables, killed
  (with everything it started) after ``timeout_s``.
- :class:`PythonHook`: a function named ``"package.module:function"``.

:func:`fire` calls every hook in turn and isolates them: a hook that
fails, hangs past its time limit or raises is logged and counted, never
raised to the caller, and the other hooks still run.

>>> hooks = alert_hooks(commands=["mail -s 'privacy budget' dpo@example.org"])  # doctest: +SKIP
>>> fire(hooks, BudgetExhausted(run_id="run-7", round=12, epsilon_spent=8.1,
...      epsilon_budget=8.0, reason="epsilon budget exhausted"))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import signal
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from shoal.core.errors import ConfigError, ProtocolError

LOGGER_NAME = "shoal.alerts"
DEFAULT_COMMAND_TIMEOUT_S = 30.0
ENVIRONMENT_PREFIX = "SHOAL_ALERT_"
KILL_WAIT_S = 5.0  # for a killed command's output to drain
OUTPUT_TAIL_CHARS = 500  # of a failed command's output, in the log line

logger = logging.getLogger(LOGGER_NAME)


class Alert(Protocol):
    """What every alert event offers its hooks."""

    @property
    def kind(self) -> str:
        """A short snake_case name of the event's type, e.g. ``"budget_exhausted"``."""
        ...

    @property
    def summary(self) -> str:
        """The event in one line, for logs and messages."""
        ...

    def fields(self) -> dict[str, Any]:
        """The event as a flat JSON object, ``kind`` included."""
        ...


@runtime_checkable
class AlertHook(Protocol):
    """Delivers an alert somewhere; may raise, :func:`fire` isolates it."""

    def __call__(self, alert: Alert) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetExhausted:
    """A run has spent its privacy budget: its data locks and training must stop."""

    kind: ClassVar[str] = "budget_exhausted"

    run_id: str
    round: int
    epsilon_spent: float
    epsilon_budget: float
    reason: str

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ProtocolError("a BudgetExhausted alert needs a run id")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ProtocolError(f"round must be an integer >= 0, got {self.round!r}")
        for name in ("epsilon_spent", "epsilon_budget"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ProtocolError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def summary(self) -> str:
        return (
            f"privacy budget of run {self.run_id} exhausted at round {self.round}: "
            f"epsilon {self.epsilon_spent:.6g} spent of {self.epsilon_budget:.6g} ({self.reason})"
        )

    def fields(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, slots=True, kw_only=True)
class CohortDropped:
    """More than the job's share of a round's cohort dropped, and what the round did about it.

    ``fallback`` is what the round did (``reselect``, ``extend``, ``abort``
    or ``none``), ``configured`` the job's choice (they differ where a
    secure or private round cannot take it, ``note`` says why).
    """

    kind: ClassVar[str] = "cohort_dropped"

    run_id: str
    round: int
    phase: str
    fallback: str
    configured: str
    dropped: int
    cohort: int
    replacements: int = 0
    extended_by_s: float = 0.0
    committed: bool = False
    note: str | None = None

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ProtocolError("a CohortDropped alert needs a run id")
        for name in ("round", "dropped", "cohort", "replacements"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ProtocolError(f"{name} must be an integer >= 0, got {value!r}")
        if not (math.isfinite(self.extended_by_s) and self.extended_by_s >= 0):
            raise ProtocolError(
                f"extended_by_s must be a finite number >= 0, got {self.extended_by_s!r}"
            )

    @property
    def summary(self) -> str:
        done = {
            "reselect": f"{self.replacements} replacements asked",
            "extend": f"deadline extended by {self.extended_by_s:.6g}s",
            "abort": "round aborted, model kept",
            "none": "no fallback",
        }.get(self.fallback, self.fallback)
        outcome = "committed" if self.committed else "not committed"
        note = f" ({self.note})" if self.note else ""
        return (
            f"{self.dropped} of {self.cohort} clients had dropped in round {self.round} "
            f"({self.phase}) of run {self.run_id} when the fallback took over: {done}{note}; "
            f"the round was {outcome}"
        )

    def fields(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRolledBack:
    """The poisoned-model playbook found a committed version BAD and rolled HEAD back.

    ``version`` was marked BAD for ``reasons`` (one per trigger); HEAD moved
    to ``rolled_back_to``, the last GOOD version; ``suspended`` clients were
    suspended (``suspend`` says whom the job asked for: flagged, cohort, none).
    """

    kind: ClassVar[str] = "model_rolled_back"

    run_id: str
    round: int
    version: int
    rolled_back_to: int
    reasons: tuple[str, ...]
    suspended: int = 0
    suspend: str = "flagged"

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ProtocolError("a ModelRolledBack alert needs a run id")
        for name in ("round", "version", "rolled_back_to", "suspended"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ProtocolError(f"{name} must be an integer >= 0, got {value!r}")
        if not self.reasons:
            raise ProtocolError("a ModelRolledBack alert needs the reasons of the verdict")

    @property
    def summary(self) -> str:
        return (
            f"run {self.run_id}: version {self.version} (round {self.round}) marked BAD "
            f"({'; '.join(self.reasons)}); HEAD rolled back to version {self.rolled_back_to}, "
            f"{self.suspended} clients suspended ({self.suspend})"
        )

    def fields(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self), "reasons": list(self.reasons)}


def alert_environment(alert: Alert) -> dict[str, str]:
    """The alert as ``SHOAL_ALERT_<FIELD>`` environment variables (text, NUL removed)."""
    variables = {}
    for key, value in alert.fields().items():
        text = value if isinstance(value, str) else json.dumps(value)
        variables[f"{ENVIRONMENT_PREFIX}{key.upper()}"] = text.replace("\0", "")
    return variables


class LoggingHook:
    """Logs each alert as one line (WARNING by default) on ``logger``."""

    def __init__(self, log: logging.Logger | None = None, *, level: int = logging.WARNING) -> None:
        self.log = log or logger
        self.level = level

    def __call__(self, alert: Alert) -> None:
        self.log.log(self.level, "alert %s: %s", alert.kind, alert.summary)

    def __repr__(self) -> str:
        return f"LoggingHook({self.log.name!r})"


class CommandHook:
    """Runs a shell command per alert: JSON on stdin, ``SHOAL_ALERT_*`` in its environment.

    The command runs in its own process group; past ``timeout_s`` the whole
    group is killed. A failure (a non-zero exit, a timeout, a command that
    cannot start) is logged at ERROR with the tail of its output, and never
    raised: the caller goes on.
    """

    def __init__(self, command: str, *, timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S) -> None:
        if not command.strip():
            raise ConfigError("an alert command must not be empty")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"an alert command's timeout_s must be > 0, got {timeout_s!r}")
        self.command = command
        self.timeout_s = timeout_s

    def __call__(self, alert: Alert) -> None:
        payload = json.dumps(alert.fields(), sort_keys=True)
        environment = os.environ | alert_environment(alert)
        try:
            process = subprocess.Popen(
                self.command,
                shell=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,  # its own process group, killed as one on a timeout
                encoding="utf-8",
                errors="replace",
            )
        except OSError as exc:
            logger.error("alert command %r could not start: %s", self.command, exc)
            return
        try:
            output, _ = process.communicate(payload, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            logger.error(
                "alert command %r timed out after %gs and was killed; output: %s",
                self.command,
                self.timeout_s,
                _tail(_kill_group(process)),
            )
            return
        if process.returncode != 0:
            logger.error(
                "alert command %r exited with status %d; output: %s",
                self.command,
                process.returncode,
                _tail(output),
            )

    def __repr__(self) -> str:
        return f"CommandHook({self.command!r}, timeout_s={self.timeout_s})"


class PythonHook:
    """Calls a function given as ``"package.module:function"`` with each alert.

    The name is resolved when the hook is made, so a typo is a
    :class:`ConfigError` at start-up rather than a lost alert later.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.function = resolve_function(target)

    def __call__(self, alert: Alert) -> None:
        self.function(alert)

    def __repr__(self) -> str:
        return f"PythonHook({self.target!r})"


def resolve_function(target: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:function"`` (attributes may be dotted)."""
    module_name, colon, attribute_path = target.partition(":")
    if not colon or not module_name or not attribute_path:
        raise ConfigError(f"a Python hook is named 'package.module:function', got {target!r}")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"Python hook {target!r}: cannot import {module_name!r}: {exc}") from exc
    for attribute in attribute_path.split("."):
        try:
            found = getattr(found, attribute)
        except AttributeError:
            raise ConfigError(f"Python hook {target!r}: no {attribute!r} in it") from None
    if not callable(found):
        raise ConfigError(f"Python hook {target!r} is not callable")
    function: Callable[..., Any] = found
    return function


def alert_hooks(
    *,
    commands: Sequence[str] = (),
    functions: Sequence[str] = (),
    timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
) -> list[AlertHook]:
    """The configured hooks, always led by a :class:`LoggingHook`."""
    hooks: list[AlertHook] = [LoggingHook()]
    hooks += [CommandHook(command, timeout_s=timeout_s) for command in commands]
    hooks += [PythonHook(target) for target in functions]
    return hooks


def fire(hooks: Iterable[AlertHook], alert: Alert) -> list[Exception]:
    """Deliver ``alert`` to every hook; returns what the failing ones raised (logged, not raised).

    An empty list means every hook succeeded. (A :class:`CommandHook`
    handles its own failures, so a failed command is logged but not
    listed.)
    """
    failures: list[Exception] = []
    for hook in hooks:
        try:
            hook(alert)
        except Exception as exc:
            failures.append(exc)
            # one line (the user's hook, not the run, failed); its traceback at debug level
            logger.error(
                "alert hook %r failed on %s: %s: %s", hook, alert.kind, type(exc).__name__, exc
            )
            logger.debug("alert hook %r's traceback", hook, exc_info=exc)
    return failures


def _kill_group(process: subprocess.Popen[str]) -> str | None:
    """Kill the command and its process group; returns what it wrote, if that can be had."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        process.kill()
    try:
        output, _ = process.communicate(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:  # a descendant that left the group holds the pipe
        process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        return None
    return output


def _tail(output: str | None) -> str:
    text = (output or "").strip()
    if not text:
        return "(none)"
    return text[-OUTPUT_TAIL_CHARS:]
