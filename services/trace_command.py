"""`rendezvous trace REQUEST_ID`: one request's trace, from Jaeger, as a terminal waterfall.

The trace is found by the `rdv.request_id` attribute the rendezvous sets on its Score span
(request ids are not personal data: docs/privacy.md), through Jaeger's query API (`GET
/api/traces?service=...&tags=...`, the API its UI uses), then printed one line per span, in
time order, indented under its parent: the offset from the trace's start, the duration, the
process (OpenTelemetry `service.name`), the span's name (and the model, for the spans of one
model), and a bar on a common time axis. Span events (the rendezvous' `answer`) get a line
with a mark at their time. `--json` prints the spans instead.

The query URL comes from `--jaeger`, else from the state file of the mesh `rendezvous up
--traces` runs (`traces.query_url`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUEST_ID_ATTRIBUTE = "rdv.request_id"
# The attributes shown after a span's name, when it has them.
SHOWN_ATTRIBUTES = ("rdv.model", "rdv.delivery_status")
# The state file's key for the mesh's trace store (written by the supervisor).
STATE_TRACES_KEY = "traces"


@dataclass
class SpanEvent:
    name: str
    time_us: int
    attributes: dict[str, Any]


@dataclass
class TraceSpan:
    """One span as Jaeger returns it, in microseconds since the epoch."""

    span_id: str
    parent_id: str | None
    service: str
    name: str
    start_us: int
    duration_us: int
    kind: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[SpanEvent] = field(default_factory=list)
    error: bool = False

    @property
    def end_us(self) -> int:
        return self.start_us + self.duration_us


@dataclass
class Trace:
    trace_id: str
    spans: list[TraceSpan]

    @property
    def start_us(self) -> int:
        return min(s.start_us for s in self.spans)

    @property
    def end_us(self) -> int:
        return max(s.end_us for s in self.spans)

    @property
    def services(self) -> set[str]:
        return {s.service for s in self.spans}


def _tags(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {str(item["key"]): item.get("value") for item in items}


def parse_jaeger_trace(data: Mapping[str, Any]) -> Trace:
    """A trace of Jaeger's JSON (one element of `/api/traces`' `data`)."""
    processes = {
        pid: str(process.get("serviceName", "?"))
        for pid, process in (data.get("processes") or {}).items()
    }
    spans: list[TraceSpan] = []
    for raw in data.get("spans") or []:
        parents = [
            ref["spanID"]
            for ref in raw.get("references") or []
            if ref.get("refType") == "CHILD_OF" and ref.get("traceID") == raw["traceID"]
        ]
        tags = _tags(raw.get("tags") or [])
        spans.append(
            TraceSpan(
                span_id=raw["spanID"],
                parent_id=parents[0] if parents else None,
                service=processes.get(raw.get("processID", ""), "?"),
                name=raw["operationName"],
                start_us=int(raw["startTime"]),
                duration_us=int(raw["duration"]),
                kind=str(tags.pop("span.kind", "")),
                attributes=tags,
                events=[
                    SpanEvent(
                        name=str(fields.pop("event", "event")),
                        time_us=int(entry["timestamp"]),
                        attributes=fields,
                    )
                    for entry in raw.get("logs") or []
                    for fields in [_tags(entry.get("fields") or [])]
                ],
                error=tags.get("error") is True or tags.get("otel.status_code") == "ERROR",
            )
        )
    return Trace(trace_id=str(data.get("traceID", "")), spans=spans)


def _children(trace: Trace) -> dict[str | None, list[TraceSpan]]:
    """Spans by parent id, each group by start time. A span whose parent is not in the trace
    (a caller that exports elsewhere) is a root (key None)."""
    known = {s.span_id for s in trace.spans}
    children: dict[str | None, list[TraceSpan]] = {}
    for span in trace.spans:
        parent = span.parent_id if span.parent_id in known else None
        children.setdefault(parent, []).append(span)
    for group in children.values():
        group.sort(key=lambda s: (s.start_us, -s.duration_us))
    return children


def ordered(trace: Trace) -> list[tuple[int, TraceSpan]]:
    """(depth, span) in time order, each span right after its parent: a depth-first walk with
    children by start time."""
    return [(depth, span) for depth, span, done in _walk(trace) if not done]


def _walk(trace: Trace) -> list[tuple[int, TraceSpan, bool]]:
    """The depth-first walk, with a (depth, span, True) entry once a span's subtree is done
    (where its events are shown: the rendezvous' answer after everything that led to it)."""
    children = _children(trace)
    out: list[tuple[int, TraceSpan, bool]] = []
    stack: list[tuple[int, TraceSpan, bool]] = [
        (0, s, False) for s in reversed(children.get(None, []))
    ]
    while stack:
        depth, span, done = stack.pop()
        out.append((depth, span, done))
        if not done:
            stack.append((depth, span, True))
            stack.extend((depth + 1, c, False) for c in reversed(children.get(span.span_id, [])))
    return out


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _bar(start_us: int, end_us: int, origin_us: int, total_us: int, width: int) -> str:
    scale = width / total_us if total_us > 0 else 0.0
    left = min(int((start_us - origin_us) * scale), width - 1)
    right = max(min(int((end_us - origin_us) * scale + 0.999), width), left + 1)
    return " " * left + "█" * (right - left) + " " * (width - right)


def _label(span: TraceSpan) -> str:
    shown = [f"{span.attributes[key]}" for key in SHOWN_ATTRIBUTES if key in span.attributes]
    suffix = f" [{', '.join(shown)}]" if shown else ""
    return f"{span.name}{suffix}{' !' if span.error else ''}"


# The event attributes shown: ours, and an exception's type (not its message or stack).
SHOWN_EVENT_ATTRIBUTES = ("rdv.", "exception.type")
# A label longer than this is cut, so one long name cannot push the bars off the screen.
MAX_LABEL = 96


def _detail(event: SpanEvent) -> str:
    shown = ", ".join(
        f"{value}"
        for key, value in event.attributes.items()
        if key.startswith(SHOWN_EVENT_ATTRIBUTES)
    )
    return f" ({shown})" if shown else ""


def _cut(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def render_waterfall(trace: Trace, *, request_id: str = "", width: int = 40) -> list[str]:
    """The trace as terminal lines: a header, then one line per span (and per span event)."""
    origin, total = trace.start_us, trace.end_us - trace.start_us
    walk = _walk(trace)
    labels = {span.span_id: _cut(("  " * depth) + _label(span)) for depth, span, _ in walk}
    event_labels = {
        id(event): _cut(("  " * (depth + 1)) + f"· {event.name}" + _detail(event))
        for depth, span, done in walk
        if done
        for event in span.events
    }
    name_width = max([len(n) for n in [*labels.values(), *event_labels.values()]] + [4])
    service_width = max([len(s.service) for s in trace.spans] + [7])
    lines = [
        f"trace {trace.trace_id}"
        + (f"  request {request_id}" if request_id else "")
        + f"  {len(trace.spans)} spans, {len(trace.services)} services, {_ms(total)} ms",
        f"{'offset ms':>9} {'dur ms':>7}  {'service':{service_width}}  {'span':{name_width}}  "
        f"|0{_ms(total).rjust(width - 1)}|",
    ]
    for _depth, span, done in walk:
        if not done:
            bar = _bar(span.start_us, span.end_us, origin, total, width)
            lines.append(
                f"{_ms(span.start_us - origin):>9} {_ms(span.duration_us):>7}  "
                f"{span.service:{service_width}}  {labels[span.span_id]:{name_width}}  |{bar}|"
            )
            continue
        for event in span.events:
            mark = _bar(event.time_us, event.time_us, origin, total, width).replace("█", "◆")
            lines.append(
                f"{_ms(event.time_us - origin):>9} {'':>7}  {span.service:{service_width}}  "
                f"{event_labels[id(event)]:{name_width}}  |{mark}|"
            )
    return lines


# ---------------------------------------------------------------------------- Jaeger's API


class TraceNotFound(LookupError):
    """No trace in the store holds a span with the request's id (yet)."""


def _get(url: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def find_trace(
    query_url: str,
    request_id: str,
    *,
    service: str = "rendezvous",
    lookback: str = "1h",
    timeout: float = 5.0,
) -> Trace:
    """The trace holding a `service` span whose `rdv.request_id` is `request_id`, whole."""
    params = urllib.parse.urlencode(
        {
            "service": service,
            "tags": json.dumps({REQUEST_ID_ATTRIBUTE: request_id}),
            "lookback": lookback,
            "limit": 20,
        }
    )
    try:
        found = _get(f"{query_url.rstrip('/')}/api/traces?{params}", timeout)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            # Jaeger says 404 until the service has sent any span.
            raise TraceNotFound(request_id) from None
        raise
    traces = found.get("data") or []
    if not traces:
        raise TraceNotFound(request_id)
    trace_id = traces[0]["traceID"]
    # Fetched by id: the search answer may hold only the spans that matched.
    whole = _get(f"{query_url.rstrip('/')}/api/traces/{trace_id}", timeout)
    return parse_jaeger_trace((whole.get("data") or traces)[0])


def wait_for_trace(
    query_url: str, request_id: str, *, wait_s: float, settle_s: float, **kwargs: Any
) -> Trace:
    """`find_trace`, asked again until it is found (spans leave each process in batches)
    and then until its span count held for `settle_s`, at most `wait_s` in all."""
    deadline = time.monotonic() + wait_s
    last: Trace | None = None
    while True:
        try:
            trace = find_trace(query_url, request_id, **kwargs)
        except TraceNotFound:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.25)
            continue
        if last is not None and len(trace.spans) == len(last.spans):
            return trace
        if time.monotonic() >= deadline:
            return trace
        last = trace
        time.sleep(settle_s)


# ---------------------------------------------------------------------------- the command


def query_url_of(state_dir: Path) -> str | None:
    """The Jaeger query URL of the mesh under `state_dir`, when it runs one."""
    try:
        state = json.loads((state_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    traces = state.get(STATE_TRACES_KEY) or {}
    url = traces.get("query_url")
    return str(url) if url else None


def cmd_trace(args: argparse.Namespace) -> int:
    query_url = args.jaeger or query_url_of(args.state_dir)
    if not query_url:
        print(
            "No trace store: the mesh runs without one (start it with `rendezvous up --traces`)"
            " and no --jaeger URL was given.",
            file=sys.stderr,
        )
        return 2
    try:
        trace = wait_for_trace(
            query_url,
            args.request_id,
            wait_s=args.wait,
            settle_s=args.settle,
            service=args.service,
            lookback=args.lookback,
        )
    except TraceNotFound:
        print(
            f"No trace holds request {args.request_id} in {query_url} (service "
            f"{args.service}, last {args.lookback}): unknown, not sampled, or not exported yet.",
            file=sys.stderr,
        )
        return 1
    except (urllib.error.URLError, OSError) as error:
        print(f"Cannot ask Jaeger at {query_url}: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {"trace_id": trace.trace_id, "spans": [span.__dict__ for span in trace.spans]},
                default=lambda o: o.__dict__,
                indent=2,
            )
        )
    else:
        print("\n".join(render_waterfall(trace, request_id=args.request_id, width=args.width)))
    return 0


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("trace", help="print one request's trace (from Jaeger) as a waterfall")
    parser.add_argument("request_id", metavar="REQUEST_ID")
    parser.add_argument("--jaeger", help="Jaeger's query URL (default: the mesh's, if --traces)")
    parser.add_argument(
        "--service", default="rendezvous", help="the service whose span holds the request id"
    )
    parser.add_argument("--lookback", default="1h", help="how far back to search (Jaeger's 1h)")
    parser.add_argument(
        "--wait", type=float, default=10.0, help="seconds to keep asking for a trace not there yet"
    )
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds the span count must hold once found"
    )
    parser.add_argument("--width", type=int, default=40, help="width of the time bars")
    parser.add_argument("--json", action="store_true", help="the spans as JSON")
    parser.set_defaults(handler=cmd_trace)
