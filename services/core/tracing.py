"""OpenTelemetry traces: where spans go, which are kept, and the spans every process shares.

`configure_tracing` installs the process' tracer provider from the standard `OTEL_*`
variables, with the service's settings (`trace_exporter`, `trace_endpoint`,
`trace_sample_ratio`) as their defaults:

| variable | default | |
|---|---|---|
| `OTEL_TRACES_EXPORTER` | `trace_exporter` | `otlp` (gRPC/protobuf), `console`, `none` |
| `OTEL_EXPORTER_OTLP_ENDPOINT` (`_TRACES_ENDPOINT`) | `trace_endpoint` | read by the exporter |
| `OTEL_TRACES_SAMPLER` / `_ARG` | `parentbased_traceidratio` / `trace_sample_ratio` | |
| `OTEL_SERVICE_NAME` | the component (`rendezvous`, `collector`, ...) | |

An OTLP exporter sends from a `BatchSpanProcessor`'s own thread, off the request path (its
queue and delay are the SDK's `OTEL_BSP_*`); the console one prints each span as it ends
(debugging, and the privacy test's scan). With no exporter nothing is recorded (ALWAYS_OFF):
spans are the SDK's non-recording ones, which still carry trace and span ids, so the trace
context crosses every hop and the logs carry the trace id.

What every process shares: the gRPC server interceptor and client interceptors of
opentelemetry-instrumentation-grpc (a SERVER span per call, continuing the caller's
`traceparent`; a CLIENT span per call made, its context in the call's metadata), without
health checks, reflection and the collector's long-lived delivery stream; and the Pulsar
hops as PRODUCER spans (`producer_span`, opened by every publish) and CONSUMER spans
(`consumer_span`, one per message a consumer processes), with the messaging semantic
conventions' attributes. No span attribute holds a request's content: objective, request
id, model, topic, sizes and statuses only (docs/privacy.md).

The gRPC interceptors run only in a process that exports spans (`exporting()`): in one
that records nothing they cost CPU on every call for spans nobody sees (measured: ~0.1 ms
per Predict call in a model container, an eighth of its CPU per call at 100 req/s). Without
them `continue_caller_trace` still continues a caller's `traceparent` where a request
enters the mesh (`Score`), so the trace id still crosses every Pulsar hop and reaches the
logs; only the runner host's calls to its models then carry no trace context.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind

EXPORTER_ENV = "OTEL_TRACES_EXPORTER"
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SAMPLER_ENV = "OTEL_TRACES_SAMPLER"
SAMPLER_ARG_ENV = "OTEL_TRACES_SAMPLER_ARG"
RESOURCE_ENV = "OTEL_RESOURCE_ATTRIBUTES"
SERVICE_NAME_ENV = "OTEL_SERVICE_NAME"
EXPORTERS = ("otlp", "console", "none")

# Calls that would flood a trace store and tell nothing: health checks (supervisors and
# probes call them every few hundred ms), reflection, and the collector's delivery stream,
# which lives as long as the collector (each delivery has a span of its own instead).
_UNTRACED_PREFIX = "/grpc."
_UNTRACED_METHODS = frozenset({"/rendezvous.v1.DeliveryService/Deliver"})

# What the W3C trace-context propagator reads from a call's metadata.
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})

# The messaging semantic conventions (opentelemetry.semconv: messaging.*).
MESSAGING_SYSTEM = "pulsar"


# Set by `configure_tracing` (or a test harness that captures spans): whether this process
# exports the spans it records, so the gRPC instrumentation is worth its cost here.
_EXPORTING = {"spans": False}


def exporting() -> bool:
    """Whether this process exports spans (an exporter other than `none`)."""
    return _EXPORTING["spans"]


def set_exporting(value: bool) -> None:
    """Say whether this process exports spans: before any server or channel is made."""
    _EXPORTING["spans"] = value


@dataclass(frozen=True)
class TraceConfig:
    """What `configure_tracing` installs, decided from the environment and the settings."""

    exporter: str
    # None: the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT itself.
    endpoint: str | None
    sampler: Sampler
    resource: Resource


def trace_config(
    service: str,
    *,
    exporter: str,
    endpoint: str,
    sample_ratio: float,
    instance: str,
    environ: Mapping[str, str] | None = None,
) -> TraceConfig:
    """The exporter, endpoint, sampler and resource: each `OTEL_*` variable set wins over the
    setting given here. An unknown exporter name is an error naming the variable."""
    env = os.environ if environ is None else environ
    chosen = (env.get(EXPORTER_ENV) or exporter).strip().lower()
    if chosen not in EXPORTERS:
        raise ValueError(f"{EXPORTER_ENV}={chosen!r}: expected one of {', '.join(EXPORTERS)}")
    sampler: Sampler
    if chosen == "none":
        sampler = ALWAYS_OFF
    elif env.get(SAMPLER_ENV):
        sampler = _sampler_from(env, sample_ratio)
    else:
        sampler = ParentBased(TraceIdRatioBased(sample_ratio))
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the component's own names.
    resource = Resource.create(
        {
            SERVICE_NAME: service,
            **({SERVICE_INSTANCE_ID: instance} if instance else {}),
            **_resource_from(env),
        }
    )
    from_env = any(env.get(name) for name in ENDPOINT_ENVS)
    return TraceConfig(chosen, None if from_env else endpoint, sampler, resource)


_SAMPLERS: dict[str, Callable[[float], Sampler]] = {
    "always_on": lambda ratio: ALWAYS_ON,
    "always_off": lambda ratio: ALWAYS_OFF,
    "traceidratio": TraceIdRatioBased,
    "parentbased_always_on": lambda ratio: ParentBased(ALWAYS_ON),
    "parentbased_always_off": lambda ratio: ParentBased(ALWAYS_OFF),
    "parentbased_traceidratio": lambda ratio: ParentBased(TraceIdRatioBased(ratio)),
}


def _sampler_from(env: Mapping[str, str], default_ratio: float) -> Sampler:
    """The sampler OTEL_TRACES_SAMPLER names, its ratio from OTEL_TRACES_SAMPLER_ARG."""
    name = env[SAMPLER_ENV].strip().lower()
    make = _SAMPLERS.get(name)
    if make is None:
        raise ValueError(f"{SAMPLER_ENV}={name!r}: expected one of {', '.join(_SAMPLERS)}")
    raw = env.get(SAMPLER_ARG_ENV)
    try:
        ratio = default_ratio if raw is None else float(raw)
    except ValueError:
        raise ValueError(f"{SAMPLER_ARG_ENV}={raw!r}: expected a ratio from 0 to 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{SAMPLER_ARG_ENV}={raw!r}: expected a ratio from 0 to 1")
    sampler: Sampler = make(ratio)
    return sampler


def _resource_from(env: Mapping[str, str]) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES (key=value,...) and OTEL_SERVICE_NAME, which wins."""
    attributes: dict[str, str] = {}
    for item in (env.get(RESOURCE_ENV) or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = value.strip()
    if env.get(SERVICE_NAME_ENV):
        attributes[SERVICE_NAME] = env[SERVICE_NAME_ENV]
    return attributes


def configure_tracing(
    service: str,
    *,
    exporter: str = "none",
    endpoint: str = "http://127.0.0.1:4317",
    sample_ratio: float = 1.0,
    instance: str = "",
) -> TracerProvider:
    """Install the process' tracer provider (see the module docstring) and return it."""
    config = trace_config(
        service,
        exporter=exporter,
        endpoint=endpoint,
        sample_ratio=sample_ratio,
        instance=instance,
    )
    provider = TracerProvider(resource=config.resource, sampler=config.sampler)
    if config.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif config.exporter == "otlp":
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(config.endpoint)))
    set_exporting(config.exporter != "none")
    trace.set_tracer_provider(provider)
    return provider


def _otlp_exporter(endpoint: str | None) -> SpanExporter:
    # Imported only when used: the exporter pulls in its generated protos at import.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    if endpoint is None:
        return OTLPSpanExporter()
    # An http:// endpoint is plaintext gRPC (the local Jaeger); https:// is TLS.
    return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


# ---------------------------------------------------------------------------- gRPC


def _traced_call(details: Any) -> bool:
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return not (method.startswith(_UNTRACED_PREFIX) or method in _UNTRACED_METHODS)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """A SERVER span per call (health, reflection and delivery aside), continuing the trace of
    the caller's `traceparent`, in a process that exports spans; none otherwise. Outermost,
    so the span sees the status the client gets."""
    if not exporting():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    # The instrumentation ships no type hints.
    made = aio_server_interceptor(filter_=_traced_call)  # type: ignore[no-untyped-call]
    interceptor: grpc.aio.ServerInterceptor = made
    return [interceptor]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A CLIENT span per call made (health, reflection and delivery aside), its trace context
    sent in the call's metadata, in a process that exports spans; none otherwise."""
    if not exporting():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    made = aio_client_interceptors(filter_=_traced_call)  # type: ignore[no-untyped-call]
    interceptors: list[grpc.aio.ClientInterceptor] = made
    return interceptors


# ---------------------------------------------------------------------------- Pulsar

_tracer = trace.get_tracer(__name__)


def short_topic(topic: str) -> str:
    """`rdv.demo.tasks` of `persistent://public/default/rdv.demo.tasks`: span names stay short."""
    return topic.rsplit("/", 1)[-1]


@contextmanager
def producer_span(
    topic: str, size: int, context: otel_context.Context | None = None
) -> Iterator[Span]:
    """The PRODUCER span of one publish, current inside the block: the trace context the
    message carries is this span's. `context` parents it (default: the current span)."""
    with _tracer.start_as_current_span(
        f"send {short_topic(topic)}", context=context, kind=SpanKind.PRODUCER
    ) as span:
        if span.is_recording():
            span.set_attributes(
                {
                    "messaging.system": MESSAGING_SYSTEM,
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "send",
                    "messaging.destination.name": topic,
                    "messaging.message.body.size": size,
                }
            )
        yield span


def consumer_span(
    topic: str,
    subscription: str,
    size: int,
    parent: otel_context.Context,
    attributes: Mapping[str, str | int] | None = None,
) -> Span:
    """The CONSUMER span of one message's processing, child of the span that published it.
    Not made current: a consumer ends it when the message is done with (acknowledged)."""
    span = _tracer.start_span(
        f"process {short_topic(topic)}", context=parent, kind=SpanKind.CONSUMER
    )
    if span.is_recording():
        span.set_attributes(
            {
                "messaging.system": MESSAGING_SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": topic,
                "messaging.destination.subscription.name": subscription,
                "messaging.message.body.size": size,
                **(attributes or {}),
            }
        )
    return span


@contextmanager
def continue_caller_trace(metadata: Any) -> Iterator[None]:
    """The caller's trace (its `traceparent`) current inside the block, when no server
    interceptor made it so (this process exports nothing); otherwise nothing to do."""
    if exporting() or not metadata:
        yield
        return
    carrier = {key: value for key, value in metadata if key in _TRACE_HEADERS}
    if not carrier:
        yield
        return
    token = otel_context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)


def in_span(span: Span) -> otel_context.Context:
    """A context whose current span is `span`: to parent spans of work on its message."""
    return trace.set_span_in_context(span)
