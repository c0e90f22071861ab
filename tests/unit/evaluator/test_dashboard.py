"""The live dashboard's HTTP server over a real loopback socket (no browser needed)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from rendezvous.v1 import evaluation_pb2

from services.evaluator.dashboard import MAX_LINE_BYTES, Dashboard
from tools.report_sample import sample_report

SECRET = "password=hunter2 in the stack trace"


@dataclass
class FakeEvaluator:
    """The report callable: records requests, answers the sample or fails as told."""

    objectives: list[str] = field(default_factory=lambda: ["demo", "other"])
    requests: list[evaluation_pb2.GetEvaluationReportRequest] = field(default_factory=list)
    failure: Exception | None = None
    delay_s: float = 0.0
    called: asyncio.Event = field(default_factory=asyncio.Event)

    async def report(
        self, request: evaluation_pb2.GetEvaluationReportRequest
    ) -> evaluation_pb2.GetEvaluationReportResponse:
        self.requests.append(request)
        self.called.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.failure is not None:
            raise self.failure
        response = sample_report()
        response.objective = request.objective
        return response

    def list_objectives(self) -> list[str]:
        return list(self.objectives)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


async def http(port: int, raw: bytes) -> Reply:
    """Send one raw request; read the whole response (the server closes the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split()[1]), headers, body)


async def get(port: int, target: str, *, method: str = "GET", host: str = "127.0.0.1") -> Reply:
    return await http(port, f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())


@pytest.fixture
def evaluator() -> FakeEvaluator:
    return FakeEvaluator()


@pytest.fixture
async def dashboard(evaluator: FakeEvaluator) -> AsyncIterator[Dashboard]:
    board = Dashboard(evaluator.report, evaluator.list_objectives, refresh_s=2.0)
    await board.start()
    try:
        yield board
    finally:
        await board.close()


async def test_health(dashboard: Dashboard) -> None:
    reply = await get(dashboard.port, "/healthz")
    assert reply.status == 200 and reply.body == b"ok\n"


async def test_the_favicon_is_no_content(dashboard: Dashboard) -> None:
    reply = await get(dashboard.port, "/favicon.ico")
    assert reply.status == 204 and reply.body == b"" and "content-length" not in reply.headers


async def test_the_api_returns_the_report_with_charts(
    dashboard: Dashboard, evaluator: FakeEvaluator
) -> None:
    before = time.time()
    reply = await get(dashboard.port, "/api/report?objective=other&window_s=120")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in reply.headers["content-security-policy"]
    body = reply.json()
    assert body["objective"] == "other"
    assert isinstance(body["timeline"], list) and len(body["timeline"]) == 30
    (request,) = evaluator.requests
    assert request.objective == "other" and request.include_charts
    assert abs(request.start_time.ToSeconds() - (before - 120)) < 5
    assert not request.HasField("end_time")


async def test_the_api_window_defaults_to_the_dashboards(
    dashboard: Dashboard, evaluator: FakeEvaluator
) -> None:
    before = time.time()
    assert (await get(dashboard.port, "/api/report?objective=demo")).status == 200
    start = evaluator.requests[0].start_time.ToSeconds()
    assert abs(start - (before - dashboard.default_window_s)) < 5


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "missing query parameter: objective"),
        ("?objective=", "missing query parameter: objective"),
        ("?objective=demo&window_s=abc", "window_s must be a number"),
        ("?objective=demo&window_s=-5", "window_s must be a number"),
        ("?objective=demo&window_s=0", "window_s must be a number"),
        ("?objective=demo&window_s=nan", "window_s must be a number"),
        ("?objective=demo&window_s=inf", "window_s must be a number"),
        ("?objective=demo&window_s=1e12", "window_s must be a number"),
        ("?objective=demo&windows=60", "unknown query parameter(s): windows"),
        ("?objective=demo&objective=other", "repeated query parameter(s): objective"),
    ],
)
async def test_bad_parameters_are_a_400_with_a_json_error(
    dashboard: Dashboard, evaluator: FakeEvaluator, query: str, message: str
) -> None:
    reply = await get(dashboard.port, f"/api/report{query}")
    assert reply.status == 400
    assert reply.headers["content-type"] == "application/json"
    assert str(reply.json()["error"]).startswith(message)
    assert evaluator.requests == []


async def test_an_unknown_objective_is_a_404_naming_the_known_ones(dashboard: Dashboard) -> None:
    reply = await get(dashboard.port, "/api/report?objective=nope")
    assert reply.status == 404
    assert reply.json() == {"error": "unknown objective: nope", "objectives": ["demo", "other"]}


async def test_a_failing_report_is_a_generic_500_and_logged(
    dashboard: Dashboard, evaluator: FakeEvaluator, caplog: pytest.LogCaptureFixture
) -> None:
    evaluator.failure = RuntimeError(SECRET)
    with caplog.at_level(logging.ERROR, logger="services.evaluator.dashboard"):
        reply = await get(dashboard.port, "/api/report?objective=demo")
    assert reply.status == 500
    assert SECRET.encode() not in reply.body and b"RuntimeError" not in reply.body
    assert "internal error" in str(reply.json()["error"])
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.getMessage() == "building the evaluation report failed"
    assert getattr(record, "objective", None) == "demo"


async def test_failing_objectives_are_a_generic_500(
    dashboard: Dashboard, evaluator: FakeEvaluator
) -> None:
    def broken() -> list[str]:
        raise KeyError(SECRET)

    dashboard._objectives = broken
    for target in ("/api/report?objective=demo", "/"):
        reply = await get(dashboard.port, target)
        assert reply.status == 500
        assert SECRET.encode() not in reply.body


async def test_a_slow_report_is_a_504(
    dashboard: Dashboard, evaluator: FakeEvaluator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.evaluator.dashboard.REPORT_TIMEOUT_S", 0.05)
    evaluator.delay_s = 1.0
    reply = await get(dashboard.port, "/api/report?objective=demo")
    assert reply.status == 504
    assert reply.json() == {"error": "the report took too long"}


async def test_the_page_defaults_to_the_first_objective(dashboard: Dashboard) -> None:
    reply = await get(dashboard.port, "/")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    policy = reply.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    page = reply.body.decode()
    assert '"objective":"demo"' in page and '"objectives":["demo","other"]' in page
    assert '"refresh_s":2.0' in page and '"window_s":600.0' in page


async def test_the_page_for_an_objective_and_a_window(dashboard: Dashboard) -> None:
    reply = await get(dashboard.port, "/?objective=other&window_s=3600")
    assert reply.status == 200
    page = reply.body.decode()
    assert '"objective":"other"' in page and '"window_s":3600.0' in page


async def test_page_errors(dashboard: Dashboard) -> None:
    assert (await get(dashboard.port, "/?objective=nope")).status == 404
    assert (await get(dashboard.port, "/?window_s=x")).status == 400
    missing = await get(dashboard.port, "/static/evil.js")
    assert missing.status == 404 and missing.headers["content-type"].startswith("text/plain")


async def test_the_page_without_objectives(evaluator: FakeEvaluator, dashboard: Dashboard) -> None:
    evaluator.objectives = []
    reply = await get(dashboard.port, "/")
    assert reply.status == 200 and '"objective":null' in reply.body.decode()


async def test_only_get_and_head(dashboard: Dashboard) -> None:
    post = await get(dashboard.port, "/api/report?objective=demo", method="POST")
    assert post.status == 405 and post.headers["allow"] == "GET, HEAD"
    head = await get(dashboard.port, "/healthz", method="HEAD")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == "3"


async def test_a_foreign_host_is_refused(dashboard: Dashboard) -> None:
    # A DNS-rebinding page would send its own name as Host.
    reply = await get(dashboard.port, "/api/report?objective=demo", host="evil.example")
    assert reply.status == 403
    assert (await get(dashboard.port, "/healthz", host="localhost")).status == 200


async def test_malformed_and_oversized_requests(dashboard: Dashboard) -> None:
    assert (await http(dashboard.port, b"nonsense\r\n\r\n")).status == 400
    long_target = "/?" + "a" * (MAX_LINE_BYTES + 10)
    assert (await get(dashboard.port, long_target)).status == 431
    # A client that connects and leaves gets nothing, and the server carries on.
    _, writer = await asyncio.open_connection("127.0.0.1", dashboard.port)
    writer.close()
    await writer.wait_closed()
    assert (await get(dashboard.port, "/healthz")).status == 200


async def test_port_zero_picks_a_free_port_and_close_stops_listening(
    evaluator: FakeEvaluator,
) -> None:
    board = Dashboard(evaluator.report, evaluator.list_objectives)
    with pytest.raises(RuntimeError):
        _ = board.port
    await board.start()
    port = board.port
    assert port > 0 and board.url == f"http://127.0.0.1:{port}/"
    assert (
        board.api_url("demo", 60)
        == f"http://127.0.0.1:{port}/api/report?objective=demo&window_s=60"
    )
    await board.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await board.close()  # idempotent


async def test_close_cancels_a_request_stuck_in_the_report(
    evaluator: FakeEvaluator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.evaluator.dashboard.CLOSE_GRACE_S", 0.05)
    evaluator.delay_s = 30.0
    board = Dashboard(evaluator.report, evaluator.list_objectives)
    await board.start()
    pending = asyncio.create_task(get(board.port, "/api/report?objective=demo"))
    await asyncio.wait_for(evaluator.called.wait(), timeout=10)
    started = time.monotonic()
    await board.close()
    assert time.monotonic() - started < 5
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, IndexError, ValueError)):
        await pending


def test_invalid_settings_are_refused(evaluator: FakeEvaluator) -> None:
    with pytest.raises(ValueError):
        Dashboard(evaluator.report, evaluator.list_objectives, refresh_s=0)
