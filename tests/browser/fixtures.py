"""Headless Chromium for the browser tests, and a page that records every error.

A plugin of the whole suite (tests/conftest.py `pytest_plugins`), so the integration tests of
the real evaluator open its dashboard with the same browser.

The browser comes from `tools.chromium.find_chromium` (installed by `make browser`). When
it cannot start, the tests fail under CI (CI=true: the page must be proven there) and are
skipped elsewhere with the command that installs one.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright

from tools.chromium import find_chromium
from tools.report_screenshot import wait_rendered

#: Playwright's default is 30 s; a page that renders takes well under a second.
PAGE_TIMEOUT_MS = 15_000
VIEWPORT_WIDTH = 1280
VIEWPORT_HEIGHT = 900


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the session."""
    async with async_playwright() as playwright:
        try:
            chromium = await playwright.chromium.launch(executable_path=find_chromium())
        except (Error, FileNotFoundError) as error:
            message = f"no headless Chromium ({error}); run `make browser` or set RDV_CHROMIUM"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class WatchedPage:
    """A page with every console error and uncaught exception it produced."""

    page: Page
    errors: list[str] = field(default_factory=list)

    async def count(self, selector: str) -> int:
        """How many elements match `selector`."""
        return await self.page.locator(selector).count()

    async def rendered(self, times: int = 1) -> None:
        """Wait until the renderer has rendered at least `times` times."""
        await wait_rendered(self.page, times, PAGE_TIMEOUT_MS / 1000)


@pytest.fixture
async def watched(browser: Browser) -> AsyncIterator[WatchedPage]:
    """A fresh page in its own context; errors are collected, not raised."""
    context = await browser.new_context(
        viewport={"width": VIEWPORT_WIDTH, "height": VIEWPORT_HEIGHT}
    )
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = await context.new_page()
    watched = WatchedPage(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watched.errors.append(f"console: {message.text}")

    def on_page_error(error: Error) -> None:
        watched.errors.append(f"pageerror: {error}")

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    try:
        yield watched
    finally:
        await context.close()
