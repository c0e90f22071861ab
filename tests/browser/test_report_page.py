"""The report page in headless Chromium: the static report from a file and the live dashboard.

Both run the same script (services/evaluator/page/report.js). Every chart must draw data
marks from a realistic report, show "no data" for an empty one, and the page must raise no
console error or uncaught exception (a CSP violation is a console error too).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rendezvous.v1 import evaluation_pb2

from services.evaluator.dashboard import Dashboard
from services.evaluator.html import render_report
from tests.browser.fixtures import WatchedPage
from tools.report_sample import empty_report, sample_report

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHARTS = ("latency", "win-share", "error", "scores", "drift")
#: The live tests' refresh period: short, so that a test sees several refreshes quickly.
FAST_REFRESH_S = 0.3


def _expected_marks(response: evaluation_pb2.GetEvaluationReportResponse) -> dict[str, int]:
    """What each chart of `response` must draw, counted from the protobuf."""
    bins = len(response.score_bin_edges) - 1
    scored = [d for d in response.distributions if sum(d.score_counts) > 0]
    return {
        "[data-chart=latency] path.series": sum(1 for d in response.distributions if d.latency),
        # One line per model, plus the default's.
        "[data-chart=win-share] path.series": len(response.models) + 1,
        "[data-chart=error] path.series": len(
            {
                m.model
                for b in response.timeline
                for m in b.models
                if m.labelled and math.isfinite(m.mean_error)
            }
        ),
        # NaN mean errors (nothing labelled yet) are skipped, not drawn at 0.
        "[data-chart=error] circle.point": sum(
            1
            for b in response.timeline
            for m in b.models
            if m.labelled and math.isfinite(m.mean_error)
        ),
        "[data-chart=scores] rect.bar": bins * len(scored),
        "[data-chart=drift] path.series": 1,
        "[data-chart=drift] line.threshold": 1,
        "[data-chart=drift] circle.alarm": sum(1 for p in response.drift_timeline if p.alarm),
    }


async def _assert_full_report(
    watched: WatchedPage, response: evaluation_pb2.GetEvaluationReportResponse
) -> None:
    for selector, expected in _expected_marks(response).items():
        assert expected > 0, f"the sample should exercise {selector}"
        assert await watched.count(selector) == expected, selector
    for chart in CHARTS:
        assert await watched.count(f"[data-chart={chart}] svg") == 1, chart
        assert await watched.count(f"[data-chart={chart}] .no-data") == 0, chart
    rows = watched.page.locator("#rdv-models tbody tr[data-model]")
    assert await rows.count() == len(response.models)
    # Incumbent first; one verdict per compared model.
    assert await rows.first.get_attribute("data-role") == "incumbent"
    verdicts = await watched.page.locator("#rdv-models [data-verdict]").all_inner_texts()
    assert sorted(verdicts) == sorted(
        {1: "better", 2: "worse", 3: "inconclusive"}[m.versus_incumbent.verdict]
        for m in response.models
        if m.HasField("versus_incumbent")
    )
    assert await watched.count("#rdv-header [data-drift=alarm]") == 1
    header = await watched.page.locator("#rdv-header").inner_text()
    assert f"{response.requests:,}" in header and "regression" in header
    # Undefined figures are shown as a dash, never as NaN.
    assert "NaN" not in await watched.page.locator("body").inner_text()


async def _assert_empty_report(watched: WatchedPage) -> None:
    for chart in CHARTS:
        assert await watched.count(f"[data-chart={chart}] .no-data") == 1, chart
        assert await watched.count(f"[data-chart={chart}] svg") == 0, chart
    assert await watched.count("#rdv-models tbody tr[data-model]") == 0
    assert await watched.count("#rdv-models .no-data") == 1
    assert await watched.count("#rdv-header [data-drift=none]") == 1


# ---------------------------------------------------------------------------------------
# The static report, from a file
# ---------------------------------------------------------------------------------------


async def _open_static(
    watched: WatchedPage, tmp_path: Path, response: evaluation_pb2.GetEvaluationReportResponse
) -> None:
    page_file = tmp_path / "report.html"
    page_file.write_text(render_report(response), encoding="utf-8")
    await watched.page.goto(page_file.as_uri())
    await watched.rendered()


async def test_the_static_report_draws_every_chart_and_the_table(
    watched: WatchedPage, tmp_path: Path
) -> None:
    response = sample_report()
    await _open_static(watched, tmp_path, response)
    await _assert_full_report(watched, response)
    assert await watched.page.title() == "Evaluation report · demo"
    assert watched.errors == []


async def test_the_static_empty_report_shows_no_data(watched: WatchedPage, tmp_path: Path) -> None:
    await _open_static(watched, tmp_path, empty_report())
    await _assert_empty_report(watched)
    assert watched.errors == []


async def test_hostile_model_names_stay_text(watched: WatchedPage, tmp_path: Path) -> None:
    response = sample_report()
    hostile = '<img src=x onerror="document.title=1"></script>'
    response.models[1].model = hostile
    response.distributions[1].model = hostile
    await _open_static(watched, tmp_path, response)
    assert await watched.count("img") == 0
    assert await watched.page.locator("#rdv-models tbody").inner_text() != ""
    assert hostile in await watched.page.locator("#rdv-models tbody").inner_text()
    assert watched.errors == []


async def test_the_page_loads_nothing_from_the_network(
    watched: WatchedPage, tmp_path: Path
) -> None:
    requested: list[str] = []
    watched.page.on("request", lambda request: requested.append(request.url))
    await _open_static(watched, tmp_path, sample_report())
    assert all(url.startswith("file://") for url in requested), requested


# ---------------------------------------------------------------------------------------
# The live dashboard, over a real loopback socket
# ---------------------------------------------------------------------------------------


@dataclass
class Evaluator:
    """The report callable the dashboard calls: counts calls, answers `answer()`."""

    answer: Callable[[], evaluation_pb2.GetEvaluationReportResponse] = sample_report
    calls: list[evaluation_pb2.GetEvaluationReportRequest] = field(default_factory=list)
    fail_after: int | None = None

    async def report(
        self, request: evaluation_pb2.GetEvaluationReportRequest
    ) -> evaluation_pb2.GetEvaluationReportResponse:
        self.calls.append(request)
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            raise RuntimeError("the store is gone")
        return self.answer()

    @staticmethod
    def objectives() -> list[str]:
        return ["demo", "other"]


@pytest.fixture
def evaluator() -> Evaluator:
    return Evaluator()


@pytest.fixture
async def dashboard(evaluator: Evaluator) -> AsyncIterator[Dashboard]:
    board = Dashboard(evaluator.report, evaluator.objectives, refresh_s=FAST_REFRESH_S)
    await board.start()
    try:
        yield board
    finally:
        await board.close()


async def test_the_dashboard_renders_and_refreshes(
    watched: WatchedPage, dashboard: Dashboard, evaluator: Evaluator
) -> None:
    await watched.page.goto(dashboard.url)
    # The page renders once empty, then once per fetched report.
    await watched.rendered(times=3)
    assert len(evaluator.calls) >= 2
    assert all(call.objective == "demo" and call.include_charts for call in evaluator.calls)
    await _assert_full_report(watched, sample_report())
    assert "Updated" in await watched.page.locator("#rdv-status").inner_text()
    options = await watched.page.locator("select[name=objective] option").all_inner_texts()
    assert options == ["demo", "other"]
    assert watched.errors == []


async def test_the_dashboard_of_an_empty_window_shows_no_data(
    watched: WatchedPage, dashboard: Dashboard, evaluator: Evaluator
) -> None:
    evaluator.answer = empty_report
    await watched.page.goto(f"{dashboard.url}?objective=other&window_s=60")
    await watched.rendered(times=2)
    await _assert_empty_report(watched)
    assert evaluator.calls[0].objective == "other"
    assert watched.errors == []


async def test_a_failed_refresh_keeps_the_last_report(
    watched: WatchedPage, dashboard: Dashboard, evaluator: Evaluator
) -> None:
    evaluator.fail_after = 1
    await watched.page.goto(dashboard.url)
    await watched.rendered(times=2)
    status = watched.page.locator("#rdv-status.error")
    await status.wait_for()
    assert "Refresh failed (internal error" in await status.inner_text()
    assert "the store is gone" not in await watched.page.content()
    await _assert_full_report(watched, sample_report())
    # The browser reports the 500 itself; nothing else may go wrong.
    assert all("status of 500" in error for error in watched.errors), watched.errors


async def test_the_api_error_statuses(
    watched: WatchedPage, dashboard: Dashboard, evaluator: Evaluator
) -> None:
    api = watched.page.request
    base = f"{dashboard.url.rstrip('/')}/api/report"
    ok = await api.get(f"{base}?objective=demo&window_s=60")
    assert ok.status == 200 and ok.headers["cache-control"] == "no-store"
    bad = await api.get(f"{base}?objective=demo&window_s=soon")
    assert bad.status == 400 and "window_s" in (await bad.json())["error"]
    unknown = await api.get(f"{base}?objective=nope")
    assert unknown.status == 404 and (await unknown.json())["objectives"] == ["demo", "other"]
    evaluator.fail_after = 0
    failed = await api.get(f"{base}?objective=demo")
    assert failed.status == 500
    assert "the store is gone" not in await failed.text()
    assert (await failed.json())["error"].startswith("internal error")


async def test_the_dashboard_without_objectives_says_so(
    watched: WatchedPage, evaluator: Evaluator
) -> None:
    board = Dashboard(evaluator.report, list, refresh_s=FAST_REFRESH_S)
    await board.start()
    try:
        await watched.page.goto(board.url)
        await watched.rendered()
        assert "No objectives yet" in await watched.page.locator("#rdv-status").inner_text()
        await _assert_empty_report(watched)
        # It reloads until one exists, without asking for a report.
        await asyncio.sleep(FAST_REFRESH_S * 2)
        assert evaluator.calls == []
        assert watched.errors == []
    finally:
        await board.close()
