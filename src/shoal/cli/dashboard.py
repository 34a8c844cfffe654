"""``shoal dashboard``: a run's live page in the browser, read from its folder and registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from shoal.cli.app import app, user_errors
from shoal.cli.operator import RegistryUrl, StateDir
from shoal.core.errors import NotFoundError
from shoal.core.limits import MAX_PORT
from shoal.dashboard import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV, DashboardServer, open_dashboard
from shoal.registry.location import DEFAULT_STATE_DIR

DashboardHost = Annotated[
    str,
    typer.Option(
        "--host",
        help="The address to serve on; any but loopback needs --token.",
    ),
]
DashboardPort = Annotated[
    int, typer.Option("--port", min=0, max=MAX_PORT, help="The port to serve on (0: any free).")
]
DashboardToken = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar=TOKEN_ENV,
        show_envvar=True,
        help="Require this token (a bearer header, or ?token= once in the browser).",
    ),
]


def announce(server: DashboardServer, console: Console) -> None:
    """Where the dashboard serves (the token is never printed)."""
    guarded = " (token required: open it once with ?token=...)" if server.token else ""
    console.print(f"dashboard: {escape(server.url)}{guarded}")


@app.command("dashboard")
@user_errors
def dashboard_command(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    host: DashboardHost = DEFAULT_HOST,
    port: DashboardPort = DEFAULT_PORT,
    token: DashboardToken = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            metavar="ID",
            show_default="the run folder's config",
            help="The run whose privacy budget to show.",
        ),
    ] = None,
) -> None:
    """Serve a run's live dashboard (running or finished) until Ctrl-C.

    The page shows the run's figures (as `shoal report` draws them), its
    model versions with their GOOD/BAD marks, the clients by status and
    device class and the privacy budget, and follows the run as rounds
    commit. It reads the folder and the registry and never writes them.
    """
    if not Path(state_dir).is_dir():
        raise NotFoundError(f"--state-dir {state_dir}: no such folder")
    server = open_dashboard(
        state_dir,
        host=host,
        port=port,
        token=token or None,
        registry_url=registry,
        run_id=run_id,
    )
    console = Console(highlight=False)
    announce(server, console)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
