"""`rendezvous trace`: a Jaeger trace parsed and printed as a waterfall, in causal order."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from typing import Any

import pytest

from services.trace_command import (
    TraceNotFound,
    find_trace,
    ordered,
    parse_jaeger_trace,
    render_waterfall,
    wait_for_trace,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
T0 = 1_700_000_000_000_000


def _span(
    span_id: str,
    parent: str | None,
    process: str,
    name: str,
    start_ms: float,
    duration_ms: float,
    tags: dict[str, Any] | None = None,
    logs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "traceID": TRACE,
        "spanID": span_id,
        "operationName": name,
        "references": (
            [{"refType": "CHILD_OF", "traceID": TRACE, "spanID": parent}] if parent else []
        ),
        "startTime": T0 + int(start_ms * 1000),
        "duration": int(duration_ms * 1000),
        "processID": process,
        "tags": [{"key": k, "type": "string", "value": v} for k, v in (tags or {}).items()],
        "logs": logs or [],
    }


def _jaeger() -> dict[str, Any]:
    # Given out of order, as Jaeger does; the collector's span before the enricher's.
    return {
        "traceID": TRACE,
        "processes": {
            "p1": {"serviceName": "rendezvous"},
            "p2": {"serviceName": "enricher"},
            "p3": {"serviceName": "collector"},
        },
        "spans": [
            _span("c1", "e2", "p3", "process rdv.predictions.rdv-0", 6.0, 0.5,
                  {"rdv.model": "ridge", "rdv.delivery_status": "DELIVERY_STATUS_ACCEPTED"}),
            _span("e1", "r2", "p2", "process rdv.demo.requests", 1.0, 1.5),
            _span("r2", "r1", "p1", "send rdv.demo.requests", 0.2, 0.6),
            _span("e2", "e1", "p2", "send rdv.demo.tasks", 1.5, 0.5),
            _span(
                "r1", "caller", "p1", "/rendezvous.v1.ScoringService/Score", 0.0, 8.0,
                {"span.kind": "server", "rdv.request_id": "req-1"},
                [{"timestamp": T0 + 7000, "fields": [
                    {"key": "event", "value": "answer"},
                    {"key": "rdv.answered_by", "value": "ridge"},
                ]}],
            ),
        ],
    }  # fmt: skip


def test_spans_come_in_causal_order_each_under_its_parent() -> None:
    trace = parse_jaeger_trace(_jaeger())
    walk = [(depth, span.name) for depth, span in ordered(trace)]
    assert walk == [
        # The caller's span is not in the trace: the Score span is the root.
        (0, "/rendezvous.v1.ScoringService/Score"),
        (1, "send rdv.demo.requests"),
        (2, "process rdv.demo.requests"),
        (3, "send rdv.demo.tasks"),
        (4, "process rdv.predictions.rdv-0"),
    ]
    score = trace.spans[4]
    assert score.kind == "server" and score.attributes["rdv.request_id"] == "req-1"
    assert trace.services == {"rendezvous", "enricher", "collector"}


def test_the_waterfall_has_a_line_per_span_with_offset_duration_service_and_bar() -> None:
    lines = render_waterfall(parse_jaeger_trace(_jaeger()), request_id="req-1", width=16)
    assert lines[0] == f"trace {TRACE}  request req-1  5 spans, 3 services, 8.00 ms"
    body = lines[2:]
    assert len(body) == 6  # five spans and the answer event
    score, send, process, enriched, delivered, answer = body
    assert score.split()[:3] == ["0.00", "8.00", "rendezvous"]
    assert score.endswith("|" + "█" * 16 + "|")
    assert "  send rdv.demo.requests" in send
    assert process.split()[:3] == ["1.00", "1.50", "enricher"]
    assert "      send rdv.demo.tasks" in enriched
    assert "process rdv.predictions.rdv-0 [ridge, DELIVERY_STATUS_ACCEPTED]" in delivered
    assert delivered.split()[:3] == ["6.00", "0.50", "collector"]
    # The bar sits at its place on the common axis: 6 ms of 8 at width 16 is column 12.
    assert delivered.endswith("|" + " " * 12 + "█" + " " * 3 + "|")
    assert "· answer (ridge)" in answer and answer.strip().startswith("7.00")
    assert answer.endswith("|" + " " * 14 + "◆" + " " * 1 + "|")


def test_the_trace_is_found_by_the_request_id_then_fetched_whole() -> None:
    asked: list[str] = []
    whole = _jaeger()

    class Jaeger(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/api/traces":
                query = urllib.parse.parse_qs(url.query)
                tags = json.loads(query["tags"][0])
                found = tags == {"rdv.request_id": "req-1"} and query["service"] == ["rendezvous"]
                # The search answers only the matching span; the trace by id answers all.
                body = {"data": [{**whole, "spans": whole["spans"][-1:]}] if found else []}
            else:
                body = {"data": [whole] if url.path == f"/api/traces/{TRACE}" else []}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Jaeger)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        trace = wait_for_trace(url, "req-1", wait_s=5, settle_s=0.05)
        assert trace.trace_id == TRACE and len(trace.spans) == 5
        with pytest.raises(TraceNotFound):
            find_trace(url, "req-2")
    finally:
        server.shutdown()
    assert asked[0].startswith("/api/traces?service=rendezvous&tags=")
    assert f"/api/traces/{TRACE}" in asked
