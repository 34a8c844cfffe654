"""The live dashboard: a run's figures, model versions, clients and privacy budget in a browser.

``shoal dashboard --state-dir DIR`` serves it for any run folder, running
or finished; ``shoal coordinator serve --dashboard`` serves it beside the
coordinator. It only reads (the run's files, the registry opened
read-only) and binds 127.0.0.1 unless a token guards it
(:func:`check_bind`).
"""

from shoal.core.serving import is_loopback
from shoal.dashboard.server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    TOKEN_ENV,
    Dashboard,
    DashboardServer,
    check_bind,
    open_dashboard,
)
from shoal.dashboard.state import RunReader, Snapshot

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "TOKEN_ENV",
    "Dashboard",
    "DashboardServer",
    "RunReader",
    "Snapshot",
    "check_bind",
    "is_loopback",
    "open_dashboard",
]
