"""The dashboard in a real headless Chromium: it loads, shows the round, and follows the run.

Needs Debian's ``chromium`` and the ``playwright`` package (never its own
browser download); skipped without them unless ``SHOAL_TEST_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.dashboard import DashboardServer, open_dashboard
from support.stepped_runs import SteppedRun, small_job

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REQUIRED = os.environ.get("SHOAL_TEST_REQUIRE_BROWSER") == "1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chromium() -> str:
    """The system's Chromium, or a skip (a failure when the browser is required)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "no chromium on PATH (apt-get install chromium)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return path


def sync_api() -> Any:
    """Playwright's sync API, or a skip (a failure when the browser is required)."""
    if REQUIRED:
        import playwright.sync_api

        return playwright.sync_api
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = chromium()
    with sync_api().sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[SteppedRun, DashboardServer]]:
    """A 3-round run that waits after each round, with the dashboard serving its folder."""
    run = SteppedRun(small_job(rounds=3), tmp_path / "run").start()
    server = open_dashboard(tmp_path / "run", port=0).start()
    try:
        yield run, server
    finally:
        run.finish()
        server.close()


def test_the_page_follows_the_run_without_a_reload(
    browser: Any, live: tuple[SteppedRun, DashboardServer], tmp_path: Path
) -> None:
    run, server = live
    expect = sync_api().expect
    assert run.next_round() == 1
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    page.goto(server.url)
    assert page.inner_text("#current-round") == "1"
    assert page.inner_text("#run-state") == "running"
    assert page.locator("#versions .status.good").count() >= 1  # version 1 passed its checks
    assert page.locator("#figures svg").count() > 0
    page.evaluate("window.stillTheSamePage = true")  # gone if the page were reloaded

    assert run.step() == 2  # the next round commits while the page is open
    expect(page.locator("#current-round")).to_have_text("2", timeout=15_000)  # by polling
    assert page.evaluate("window.stillTheSamePage") is True
    assert page.inner_text("#live") == "live"
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    assert shot.stat().st_size > 20_000  # a drawn page, not a blank one
    assert errors == []
