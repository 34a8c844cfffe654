"""The typer application, its error policy and its logging: one clear line, no traceback.

Every command and command group takes ``-v/--verbose`` (info; ``-vv``
debug) and ``--log-level LEVEL``, which wins over ``-v``. Without them
Shoal logs warnings and errors on stderr, so that a failure the coordinator
or a client logs (a client that gave up, a refused request) is seen; a
command's ``--quiet`` leaves only errors. MLflow's own log lines follow the
same level (:func:`shoal.telemetry.tracking.set_mlflow_log_level`).
"""

from __future__ import annotations

import copy
import enum
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import wraps
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from shoal.core.errors import ConfigError, ShoalError
from shoal.telemetry.tracking import set_mlflow_log_level

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class LogLevel(enum.Enum):
    """The levels ``--log-level`` accepts."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"

    @property
    def number(self) -> int:
        return int(getattr(logging, self.name))


@dataclass
class LoggingChoice:
    """What the options of one ``shoal`` invocation asked of the logs."""

    verbose: int = 0
    level: LogLevel | None = None
    quiet: bool = False

    def level_number(self) -> int:
        if self.level is not None:
            return self.level.number
        if self.verbose:
            return logging.DEBUG if self.verbose > 1 else logging.INFO
        return logging.ERROR if self.quiet else logging.WARNING


class _StderrHandler(logging.Handler):
    """Writes to ``sys.stderr`` as it is when a record comes (a progress display or a test
    runner may have replaced it since the handler was made)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def configure_logging(level: int) -> None:
    """Log at ``level`` and above to stderr, Shoal's lines and every library's, MLflow's too."""
    root = logging.getLogger()
    if not any(isinstance(handler, _StderrHandler) for handler in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    set_mlflow_log_level(level)


_CHOICE_KEY = "shoal.logging"
_current = LoggingChoice()  # the choice of the invocation being run


def _take_logging_option(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    """Add one level's ``-v``/``--log-level`` to the invocation's choice, and apply it."""
    global _current
    choice = ctx.meta.get(_CHOICE_KEY)
    if not isinstance(choice, LoggingChoice):  # the first option of a new invocation
        choice = ctx.meta[_CHOICE_KEY] = _current = LoggingChoice()
    if param.name == "verbose":
        choice.verbose += int(value or 0)
    elif value is not None:
        choice.level = value if isinstance(value, LogLevel) else LogLevel(str(value).lower())
    configure_logging(choice.level_number())
    return value


def quiet_logging() -> None:
    """A command's ``--quiet``: log only errors, unless ``-v`` or ``--log-level`` asked for more."""
    _current.quiet = True
    configure_logging(_current.level_number())


Verbose = Annotated[
    int,
    typer.Option(
        "--verbose",
        "-v",
        count=True,
        callback=_take_logging_option,
        rich_help_panel="Logging",
        show_default=False,
        help="Log more: -v adds info, -vv debug.",
    ),
]
LogLevelOption = Annotated[
    LogLevel | None,
    typer.Option(
        "--log-level",
        metavar="LEVEL",
        case_sensitive=False,
        callback=_take_logging_option,
        rich_help_panel="Logging",
        show_default="warning",
        help="Log this level and above: debug, info, warning, error or critical.",
    ),
]
_LOGGING_OPTIONS = ("verbose", "log_level")


class ShoalGroup(TyperGroup):
    """The ``shoal`` command: hands its logging options to every group and command below it.

    The copies take effect through the same callback but are not passed to
    the command functions, which therefore need not declare them.
    """

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        options = [param for param in self.params if param.name in _LOGGING_OPTIONS]
        _lend(options, self.commands.values())


def _lend(options: list[Any], commands: Iterable[Any]) -> None:
    for command in commands:
        taken = {param.name for param in command.params}
        for option in options:
            if option.name not in taken:
                lent = copy.copy(option)
                lent.expose_value = False
                command.params.append(lent)
        _lend(options, getattr(command, "commands", {}).values())


app = typer.Typer(
    name="shoal",
    help="Shoal: federated learning at scale, across clients that keep their data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=ShoalGroup,
)
err_console = Console(stderr=True, soft_wrap=True)


@app.callback()
def _root(verbose: Verbose = 0, log_level: LogLevelOption = None) -> None:
    """Shoal: federated learning at scale."""


P = ParamSpec("P")
R = TypeVar("R")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn Shoal's own errors into one red line and an exit code (2 for config, else 1).

    Foreign errors are translated into Shoal's hierarchy where they happen;
    an ``OSError`` that reaches the command anyway (a file or a folder the
    environment refuses) is an environment problem: one line, exit 1.
    """

    @wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            _print_error("config error", str(exc))
            raise typer.Exit(EXIT_CONFIG) from None
        except ShoalError as exc:
            _print_error("error", str(exc))
            raise typer.Exit(EXIT_FAILURE) from None
        except OSError as exc:
            where = "" if exc.filename is None else f": {exc.filename}"
            _print_error("error", f"{exc.strerror or exc}{where}")
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper


def _print_error(kind: str, message: str) -> None:
    """``kind: message`` on stderr as one line (a message's own line breaks become spaces)."""
    one_line = " ".join(message.split())
    err_console.print(f"[red]{kind}:[/red] {escape(one_line)}", highlight=False)


def main() -> None:
    """Entry point of the ``shoal`` script."""
    app(prog_name="shoal")
