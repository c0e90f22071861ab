"""Structured logs, OpenTelemetry trace context and Prometheus-style metrics.

Trace context crosses every hop: gRPC metadata on calls (the instrumentation's
interceptors), Pulsar message properties on messages (see `inject` / `extract`), so one
request is one trace. Where spans go and which are kept: `services.core.tracing`.
Metrics live in one process-wide registry, exposed on `/metrics` when a
service's `metrics_port` is set; label values are kept low-cardinality (model,
objective, outcome), never request ids.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import Counter, Gauge, Histogram, start_http_server

_STANDARD_RECORD_KEYS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, trace id."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD_RECORD_KEYS and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The current trace context as string properties (traceparent, tracestate)."""
    out: dict[str, str] = dict(carrier or {})
    propagate.inject(out)
    return out


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """The trace context a message or call carried, to parent the next span."""
    return propagate.extract(dict(carrier))


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve `/metrics` on `host:port` (no server when `port` is 0). Loopback by default:
    a container or Kubernetes deployment binds 0.0.0.0 (`metrics_host`) for its scraper."""
    if port > 0:
        start_http_server(port, addr=host)


# Every counter, gauge and histogram made here, by name, with the shape it was made with.
# Ours, not the registry's: prometheus_client keeps its own index private.
_MADE: dict[str, tuple[dict[str, object], Counter | Gauge | Histogram]] = {}

_C = TypeVar("_C", Counter, Gauge, Histogram)


def _one_per_name(
    kind: type[_C], name: str, shape: dict[str, object], make: Callable[[], _C]
) -> _C:
    """The collector made for `name`, made now if it is the first ask.

    A second ask must describe the same metric (kind, labels, buckets); anything else is
    two metrics sharing a name, an error the caller should hear about by name.
    """
    made = _MADE.get(name)
    if made is None:
        collector = make()
        _MADE[name] = (shape, collector)
        return collector
    made_shape, existing = made
    if not isinstance(existing, kind) or made_shape != shape:
        raise ValueError(
            f"metric {name!r} was made as {type(existing).__name__} {made_shape}, "
            f"asked again as {kind.__name__} {shape}"
        )
    return existing


def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    """A process-wide counter; asking twice for one name returns the same counter."""
    return _one_per_name(Counter, name, {"labels": labels}, lambda: Counter(name, doc, labels))


def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    """A process-wide gauge; asking twice for one name returns the same gauge."""
    return _one_per_name(Gauge, name, {"labels": labels}, lambda: Gauge(name, doc, labels))


def histogram(
    name: str, doc: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] | None = None
) -> Histogram:
    """A process-wide histogram; asking twice for one name returns the same histogram."""
    chosen = SLA_BUCKETS_S if buckets is None else buckets
    return _one_per_name(
        Histogram,
        name,
        {"labels": labels, "buckets": chosen},
        lambda: Histogram(name, doc, labels, buckets=chosen),
    )


# Milliseconds matter here: the rendezvous adds single-digit ms, and an SLA of 50 ms must be
# resolved (p99 against it, the share within it): bounds every 5 ms from 40 to 60 ms, so
# `histogram_quantile` interpolates near the SLA between close bounds, and `le="0.05"` counts
# exactly the calls within 50 ms. 25 buckets: a few per method, model or objective.
SLA_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.045,
    0.05,
    0.055,
    0.06,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
