"""Spans the code under test ends, captured in memory: the `spans` fixture (tests/conftest.py).

The process has one global tracer provider (OpenTelemetry refuses a second), installed here
once for the whole session (`install`): an SDK provider whose sampler records nothing, as a
service with no exporter, except while a test holds the `spans` fixture; then it is
parent-based, always on, and the test's own in-memory exporter sees what ends meanwhile. So
no test pays for recording spans another test wanted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from services.core import tracing

_RECORDING = ParentBased(ALWAYS_ON)


class _Switch(Sampler):
    """ALWAYS_OFF, or parent-based always on while a test captures spans."""

    def __init__(self) -> None:
        self.capturing = 0

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        chosen = _RECORDING if self.capturing else ALWAYS_OFF
        return chosen.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "TestSwitch"


_SWITCH = _Switch()


def install() -> TracerProvider:
    """The session's provider (installed on the first call). The process counts as one that
    exports spans (`services.core.tracing.exporting`): its servers and channels get the gRPC
    instrumentation whose spans the tests capture."""
    tracing.set_exporting(True)
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider(sampler=_SWITCH))
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    return provider


class Captured:
    """The spans ended so far, and look-ups by name."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self._exporter = exporter

    def all(self) -> list[ReadableSpan]:
        return list(self._exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.all() if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} spans named {name!r} in {self.names()}"
        return found[0]

    def names(self) -> list[str]:
        return [span.name for span in self.all()]


@contextmanager
def capturing() -> Iterator[Captured]:
    """Record spans, into an exporter of this block's own, until the block ends."""
    exporter = InMemorySpanExporter()
    install().add_span_processor(SimpleSpanProcessor(exporter))
    _SWITCH.capturing += 1
    try:
        yield Captured(exporter)
    finally:
        _SWITCH.capturing -= 1
        exporter.shutdown()
