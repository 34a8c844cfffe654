"""A real Prometheus server scrapes a live coordinator's /metrics during a network run.

The test starts Debian's ``prometheus`` on 127.0.0.1 with a scrape config
for the coordinator's metrics port (every second), serves a small job over
gRPC to digits clients, and asks Prometheus' HTTP API, while the
coordinator still serves, for the rounds committed and the RPCs counted.
Every PromQL expression of the shipped Grafana dashboard is then run
against the same server: one that does not parse fails here. Without the
binary the test skips, unless ``SHOAL_TEST_REQUIRE_PROMETHEUS=1`` (CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.config import parse_config
from support.grafana import dashboard_queries
from support.jobs import network_job, serve_to_digits_clients

pytestmark = pytest.mark.timeout(120)

TOKEN = "prometheus-token"
CLIENTS = 3
ROUNDS = 2
WAIT_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is not None:
        return found
    if os.environ.get("SHOAL_TEST_REQUIRE_PROMETHEUS") == "1":
        pytest.fail("SHOAL_TEST_REQUIRE_PROMETHEUS=1 but no prometheus binary is installed")
    pytest.skip("no prometheus binary (Debian's `prometheus` package)")


class Prometheus:
    """A Prometheus server's HTTP API on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **query: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(query)}" if query else self.base + path
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read()) if path.startswith("/api/") else answer.status

    def query(self, expression: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.get("/api/v1/query", query=expression)
        assert answer["status"] == "success", answer
        return answer["data"]

    def value(self, expression: str) -> float | None:
        """The first sample of an instant query, or None when it has none."""
        result = self.query(expression)["result"]
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def scraping(tmp_path: Path) -> Iterator[tuple[Prometheus, int]]:
    """A Prometheus server scraping 127.0.0.1:<port> every second; yields it and the port."""
    binary = prometheus_binary()
    metrics_port, web_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: shoal\n    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prometheus = Prometheus(web_port)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if prometheus.get("/-/ready") == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)
        yield prometheus, metrics_port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


COMMITTED = 'sum(shoal_rounds_total{phase="fit", outcome="committed"})'
CHECK_INS = 'sum(shoal_rpc_duration_seconds_count{method="CheckIn"})'


async def scraped(prometheus: Prometheus) -> dict[str, float | None]:
    """Ask Prometheus until it has scraped every round committed; then the figures it holds."""
    deadline = time.monotonic() + WAIT_S
    while (await asyncio.to_thread(prometheus.value, COMMITTED) or 0) < ROUNDS:
        assert time.monotonic() < deadline, "prometheus never scraped the rounds committed"
        await asyncio.sleep(0.2)
    names = [COMMITTED, CHECK_INS, "shoal_model_version", "shoal_clients_connected"]
    return {name: await asyncio.to_thread(prometheus.value, name) for name in names}


def test_prometheus_scrapes_a_live_coordinator(
    tmp_path: Path, scraping: tuple[Prometheus, int]
) -> None:
    prometheus, metrics_port = scraping
    sections = network_job(
        tmp_path,
        run_id="run-prometheus",
        token=TOKEN,
        clients=CLIENTS,
        per_round=CLIENTS,
        run={"rounds": ROUNDS},
        round={"quorum": 1.0, "deadline_s": 30},
        # the coordinator lingers until the test has read Prometheus, then is stopped
        coordinator={"metrics_port": metrics_port, "linger_s": 60},
    )
    config = parse_config(sections)
    figures: dict[str, float | None] = {}

    async def main() -> None:
        watching: list[asyncio.Task[None]] = []
        served = asyncio.Event()

        async def watch() -> None:
            try:
                figures.update(await scraped(prometheus))
            finally:
                if not served.is_set():  # stop the coordinator as an operator does
                    os.kill(os.getpid(), signal.SIGTERM)

        def on_ready(port: int) -> None:
            watching.append(asyncio.create_task(watch()))

        try:
            await serve_to_digits_clients(
                tmp_path, config, clients=CLIENTS, token=TOKEN, on_ready=on_ready
            )
        finally:
            served.set()  # its signal handlers are gone: never signal this process again
            for task in watching:
                task.cancel()
            for outcome in await asyncio.gather(*watching, return_exceptions=True):
                if isinstance(outcome, Exception):
                    raise outcome

    asyncio.run(main())
    assert figures[COMMITTED] == ROUNDS
    assert (figures[CHECK_INS] or 0) > 0
    assert figures["shoal_model_version"] == ROUNDS
    assert figures["shoal_clients_connected"] == CLIENTS
    for expression in dashboard_queries():  # the shipped dashboard's queries all parse
        prometheus.query(expression)
