"""The ``shoal`` command line: the front door to every Shoal job."""

import os
import sys

# gRPC Python has no minimum-TLS-version option. This cipher list (the value
# of shoal.transport.certs.TLS13_ONLY_CIPHER_SUITES) leaves TLS 1.2 nothing
# to negotiate, so the coordinator and clients speak TLS 1.3 only. It must be
# set before grpc is imported; an operator's own setting wins.
os.environ.setdefault("GRPC_SSL_CIPHER_SUITES", "ECDHE-PSK-CHACHA20-POLY1305")
# gRPC's core logs every failed TLS handshake at INFO, one stderr line each and no limit: any
# peer that reaches the port (a port scan, a plaintext client) could flood the log. Shoal
# logs its own refusals, rate-limited; the core says only its errors. Before grpc's import too.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# `shoal simulate` with a process pool: its workers' forkserver imports Shoal on another core
# while this process does the same below (shoal.forkserver imports nothing of Shoal's)
from shoal.forkserver import start_early

start_early(sys.argv)

from shoal.cli import (  # noqa: E402 (after the forkserver's start)
    attest,
    audit,
    certs,
    clients,
    dashboard,
    keyholder,
    models,
    network,
    operator,
    report,
    rounds,
    signing,
    simulate,
    unlearn,
    versions,
)
from shoal.cli.app import app, main  # noqa: E402

__all__ = [
    "app",
    "attest",
    "audit",
    "certs",
    "clients",
    "dashboard",
    "keyholder",
    "main",
    "models",
    "network",
    "operator",
    "report",
    "rounds",
    "signing",
    "simulate",
    "unlearn",
    "versions",
]
