"""Render the evaluation report page to a PNG in headless Chromium.

    .venv/bin/python -m tools.report_screenshot --url http://127.0.0.1:8790/?objective=demo
    .venv/bin/python -m tools.report_screenshot --html report.html --out report.png
    .venv/bin/python -m tools.report_screenshot --json response.json
    .venv/bin/python -m tools.report_screenshot --sample   # tools/report_sample.py's report

--url takes a running evaluator's dashboard (it waits for the first refresh); --html a page
written by `services.evaluator.html.render_report`; --json a GetEvaluationReportResponse in
protobuf JSON (as `MessageToJson` writes it), rendered here. The default output is
docs/images/evaluation-report.png. The browser is found as in `tools.chromium`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from google.protobuf import json_format
from playwright.async_api import Page, async_playwright
from rendezvous.v1 import evaluation_pb2

from services.evaluator.html import render_report
from tools.chromium import find_chromium
from tools.report_sample import sample_report

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("docs/images/evaluation-report.png")
#: A laptop-wide viewport: the charts sit two by two.
VIEWPORT = {"width": 1280, "height": 900}
#: One CSS pixel per image pixel: sharp enough for the docs, small enough for git.
DEVICE_SCALE = 1
#: How long to wait for the page (or the dashboard's first refresh) to render, in seconds.
RENDER_TIMEOUT_S = 30.0
#: How often to look whether it has.
POLL_INTERVAL_S = 0.05
# The renderer counts its renderings on <body>; the live page renders once empty first.
_RENDERINGS = "Number(document.body.dataset.rendered || 0)"
STATIC_RENDERINGS = 1
LIVE_RENDERINGS = 2


async def wait_rendered(page: Page, times: int, timeout_s: float = RENDER_TIMEOUT_S) -> None:
    """Wait until the report script has rendered `times` times.

    Polled from here with `page.evaluate`: Playwright's `wait_for_function` compiles its
    predicate inside the page, which the page's CSP (no 'unsafe-eval') rightly forbids.
    """
    async with asyncio.timeout(timeout_s):
        # The state is in the browser's process: there is no event here to wait on.
        while await page.evaluate(_RENDERINGS) < times:  # noqa: ASYNC110
            await asyncio.sleep(POLL_INTERVAL_S)


async def screenshot(url: str, out: Path, *, live: bool) -> None:
    """Open `url` in headless Chromium and save a full-page PNG to `out`."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=find_chromium())
        try:
            page: Page = await browser.new_page(
                viewport=VIEWPORT,  # type: ignore[arg-type]
                device_scale_factor=DEVICE_SCALE,
            )
            await page.goto(url)
            await wait_rendered(page, LIVE_RENDERINGS if live else STATIC_RENDERINGS)
            out.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(out), full_page=True)
        finally:
            await browser.close()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="a running evaluator's dashboard URL")
    source.add_argument("--html", type=Path, help="a page written by render_report")
    source.add_argument("--json", type=Path, help="a GetEvaluationReportResponse as JSON")
    source.add_argument("--sample", action="store_true", help="tools/report_sample.py's report")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG ({DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the screenshot; exit status 0 on success."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = _parse(argv)
    if args.url:
        asyncio.run(screenshot(args.url, args.out, live=True))
    elif args.html:
        asyncio.run(screenshot(args.html.resolve().as_uri(), args.out, live=False))
    else:
        if args.sample:
            response = sample_report()
        else:
            response = json_format.Parse(
                args.json.read_text(encoding="utf-8"), evaluation_pb2.GetEvaluationReportResponse()
            )
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp) / "report.html"
            page.write_text(render_report(response), encoding="utf-8")
            asyncio.run(screenshot(page.as_uri(), args.out, live=False))
    log.info("screenshot written", extra={"path": str(args.out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
