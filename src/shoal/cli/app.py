"""The typer application and its error policy: one clear line, no traceback for user mistakes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from shoal.core.errors import ConfigError, ShoalError

app = typer.Typer(
    name="shoal",
    help="Shoal: federated learning at scale, across clients that keep their data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True, soft_wrap=True)


@app.callback()
def _root() -> None:
    """Shoal: federated learning at scale."""


P = ParamSpec("P")
R = TypeVar("R")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn Shoal's own errors into one red line and an exit code (2 for config)."""

    @wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            err_console.print(f"[red]config error:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(EXIT_CONFIG) from None
        except ShoalError as exc:
            err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper


def main() -> None:
    """Entry point of the ``shoal`` script."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    app(prog_name="shoal")
