"""Traces: the OTEL_* variables over the settings, the caller's trace continued over real gRPC,
and the Pulsar hops as PRODUCER and CONSUMER spans with the messaging attributes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind
from rendezvous.v1 import model_pb2, model_pb2_grpc, task_pb2

from services.core import tracing
from services.core.bus import Envelope
from services.core.channels import aio_channel
from services.core.consumer import BoundedConsumer
from services.core.tracing import trace_config
from tests.fakes.memory_bus import MemoryBus
from tests.span_capture import Captured
from tests.unit.models.model_testing import ServeModel

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


def _config(environ: dict[str, str], **settings: Any) -> Any:
    given = {"exporter": "otlp", "endpoint": "http://127.0.0.1:4417", "sample_ratio": 0.1}
    return trace_config("rendezvous", instance="rdv-0", environ=environ, **{**given, **settings})


def test_the_settings_are_the_defaults_when_no_variable_is_set() -> None:
    config = _config({})
    assert config.exporter == "otlp"
    assert config.endpoint == "http://127.0.0.1:4417"
    assert isinstance(config.sampler, ParentBased)
    assert "TraceIdRatioBased{0.1}" in config.sampler.get_description()  # type: ignore[no-untyped-call]
    assert config.resource.attributes[SERVICE_NAME] == "rendezvous"
    assert config.resource.attributes[SERVICE_INSTANCE_ID] == "rdv-0"


def test_each_otel_variable_wins_over_its_setting() -> None:
    config = _config(
        {
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://elsewhere:4317",
            "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_SERVICE_NAME": "rendezvous-eu",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging,service.name=no",
        }
    )
    assert config.exporter == "console"
    # The exporter reads the endpoint variable itself.
    assert config.endpoint is None
    assert isinstance(config.sampler, TraceIdRatioBased)
    assert config.sampler.rate == 0.25
    assert config.resource.attributes[SERVICE_NAME] == "rendezvous-eu"
    assert config.resource.attributes["deployment.environment"] == "staging"


def test_no_exporter_records_nothing_whatever_the_sampler() -> None:
    config = _config({"OTEL_TRACES_EXPORTER": "none", "OTEL_TRACES_SAMPLER": "always_on"})
    assert config.exporter == "none"
    assert config.sampler is ALWAYS_OFF


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER='sometimes'"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG='2'",
        ),
    ],
)
def test_a_bad_variable_is_an_error_naming_it(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(environ)


async def test_a_server_continues_the_callers_trace(
    serve_model: ServeModel, spans: Captured
) -> None:
    model = await serve_model("sum")
    async with grpc.aio.insecure_channel(model.container.endpoint) as channel:
        stub = model_pb2_grpc.ModelServiceStub(channel)
        request = model_pb2.PredictRequest(request_id="r-1", objective="o")
        await stub.Predict(request, metadata=(("traceparent", TRACEPARENT),), timeout=5)
    server = spans.one("/rendezvous.v1.ModelService/Predict")
    assert server.kind == SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == CALLER_SPAN
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 0


async def test_exporting_nothing_no_grpc_span_is_made_yet_a_callers_trace_continues(
    serve_model: ServeModel, spans: Captured
) -> None:
    tracing.set_exporting(False)
    try:
        assert tracing.server_interceptors() == []
        assert tracing.client_interceptors() == []
        # What Score does with the metadata a caller sent: its trace is current inside.
        with tracing.continue_caller_trace((("traceparent", TRACEPARENT), ("x-other", "1"))):
            current = trace.get_current_span().get_span_context()
            assert format(current.trace_id, "032x") == TRACE_ID
            assert format(current.span_id, "016x") == CALLER_SPAN
        assert not trace.get_current_span().get_span_context().is_valid
        # A server and a channel made meanwhile: a call through them makes no gRPC span.
        model = await serve_model("sum")
        async with aio_channel(model.container.endpoint) as channel:
            await model_pb2_grpc.ModelServiceStub(channel).Predict(
                model_pb2.PredictRequest(request_id="r-quiet", objective="o"),
                metadata=(("traceparent", TRACEPARENT),),
                timeout=5,
            )
        assert not spans.named("/rendezvous.v1.ModelService/Predict")
    finally:
        tracing.set_exporting(True)
    # Exporting again: the same call is traced (the test above is not vacuous).
    assert len(tracing.server_interceptors()) == 1


async def test_a_mesh_channel_sends_its_trace_and_health_checks_make_no_span(
    serve_model: ServeModel, spans: Captured
) -> None:
    model = await serve_model("sum")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        async with aio_channel(model.container.endpoint) as channel:
            await model_pb2_grpc.ModelServiceStub(channel).Predict(
                model_pb2.PredictRequest(request_id="r-2", objective="o"), timeout=5
            )
    [server, client] = sorted(
        spans.named("/rendezvous.v1.ModelService/Predict"), key=lambda s: s.kind.value
    )
    assert (server.kind, client.kind) == (SpanKind.SERVER, SpanKind.CLIENT)
    trace_id = caller.get_span_context().trace_id
    assert {client.context.trace_id, server.context.trace_id} == {trace_id}
    assert client.parent is not None and client.parent.span_id == caller.get_span_context().span_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    # The supervisor's and the container's own health checks: nothing recorded.
    assert not [name for name in spans.names() if "Health" in name]


async def test_a_pulsar_hop_is_a_producer_span_then_a_consumer_span(
    memory_bus: MemoryBus, spans: Captured
) -> None:
    topic = memory_bus.topics.tasks("tracing")
    subscription = await memory_bus.subscribe(topic, "runners", task_pb2.EnrichedTask)
    publisher = await memory_bus.publisher(topic, task_pb2.EnrichedTask)
    handled: asyncio.Queue[trace.Span] = asyncio.Queue()

    async def handle(envelope: Envelope[task_pb2.EnrichedTask]) -> None:
        # The message's processing span is current in its handler.
        handled.put_nowait(trace.get_current_span())
        await subscription.ack(envelope)

    consumer = BoundedConsumer(
        subscription, handle, max_in_flight=4, retry_delay_s=0.01, name="test"
    )
    consumer.start()
    try:
        with trace.get_tracer("test").start_as_current_span("request") as request:
            await publisher.publish(task_pb2.EnrichedTask(), key="k")
        current = await asyncio.wait_for(handled.get(), 5)
    finally:
        await consumer.stop(1.0)
    producer = spans.one("send rdv.tracing.tasks")
    assert producer.kind == SpanKind.PRODUCER
    assert producer.parent is not None
    assert producer.parent.span_id == request.get_span_context().span_id
    assert producer.attributes is not None
    assert producer.attributes["messaging.system"] == "pulsar"
    assert producer.attributes["messaging.operation.type"] == "send"
    assert producer.attributes["messaging.destination.name"] == topic
    processed = spans.one("process rdv.tracing.tasks")
    assert processed.kind == SpanKind.CONSUMER
    assert processed.parent is not None and processed.parent.span_id == producer.context.span_id
    assert processed.context.trace_id == request.get_span_context().trace_id
    assert processed.attributes is not None
    assert processed.attributes["messaging.operation.type"] == "process"
    assert processed.attributes["messaging.destination.subscription.name"] == "runners"
    assert current.get_span_context().span_id == processed.context.span_id


async def test_a_publish_outside_any_trace_starts_none(
    memory_bus: MemoryBus, spans: Captured
) -> None:
    topic = memory_bus.topics.tasks("quiet")
    subscription = await memory_bus.subscribe(topic, "s", task_pb2.EnrichedTask)
    publisher = await memory_bus.publisher(topic, task_pb2.EnrichedTask)
    await publisher.publish(task_pb2.EnrichedTask())
    envelope = await asyncio.wait_for(subscription.receive(), 5)
    assert "traceparent" not in envelope.properties
    assert spans.named("send rdv.quiet.tasks") == []
