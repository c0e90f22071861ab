"""The model runner: enriched tasks in, predictions out to each task's return address.

Flow per burst of tasks (the tasks the client already holds, up to `max_batch`; one
under light load), each burst in its own asyncio task, at most `max_calls_in_flight`
bursts and `concurrency` tasks in flight; tasks that arrive meanwhile queue up into the
next burst:

1. skip (count, ack, publish nothing) when the task's deadline has passed, or when
   this deployment is a challenger or canary and the subject denied
   experimentation (the rendezvous resolved the objective's default consent
   into the task, so only DENIED matters here);
2. call `ModelService.PredictBatch` once for the burst (`Predict` for a lone task, or per
   task for a model that answers PredictBatch with UNIMPLEMENTED) with the time left to
   the deadline as timeout and the trace context in the call's metadata;
3. publish a `PredictionEvent` (the prediction, or the model's error, DEADLINE_EXCEEDED
   included: the rendezvous records it) to the return address, keyed by request id,
   inside a span that continues the first task's trace and links the others; the
   burst's predictions are published in one turn of the loop, so they leave as one batch;
4. ack after the publish; nack when the publish failed (at least once).

A model restart costs error predictions, not the runner: the channel reconnects
with a short backoff. The runner serves only gRPC health (+ reflection), SERVING
once subscribed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from opentelemetry import trace
from rendezvous.v1 import common_pb2, model_pb2, model_pb2_grpc, task_pb2

from services.core.bus import Bus, Envelope, Subscription, SubscriptionMode, connect
from services.core.consumer import BoundedConsumer
from services.core.protos import (
    duration_from_seconds,
    seconds_until,
    timestamp_from_ns,
)
from services.core.server import GrpcServer, run, write_ready_file
from services.core.telemetry import counter, histogram, inject, tracer
from services.core.topics import Topics
from services.runner.settings import RunnerRole, RunnerSettings

log = logging.getLogger(__name__)

PUBLISHED = counter(
    "rdv_runner_predictions_published",
    "Prediction events published to a return address",
    ("model", "outcome"),
)
MODEL_ERRORS = counter(
    "rdv_runner_model_errors", "Predict calls that ended with an error", ("model", "code")
)
SKIPPED = counter("rdv_runner_skipped", "Tasks skipped without a model call", ("model", "reason"))
PUBLISH_FAILURES = counter(
    "rdv_runner_publish_failures", "Prediction events that could not be published", ("model",)
)
RECEIVE_ERRORS = counter("rdv_runner_receive_errors", "Failed receives from the bus", ("model",))
MODEL_LATENCY = histogram(
    "rdv_runner_model_latency_seconds",
    "Duration of Predict calls as the runner saw them",
    ("model", "outcome"),
)

BATCH_SIZE = histogram(
    "rdv_runner_batch_size",
    "Tasks per model call (PredictBatch, or 1 for Predict)",
    ("model",),
    buckets=(1, 2, 4, 8, 16, 32, 64),
)

ROLES: dict[RunnerRole, common_pb2.ModelRole.ValueType] = {
    "incumbent": common_pb2.MODEL_ROLE_INCUMBENT,
    "challenger": common_pb2.MODEL_ROLE_CHALLENGER,
    "canary": common_pb2.MODEL_ROLE_CANARY,
}
# Roles that exist for experimentation: a subject's DENIED keeps them from the task.
EXPERIMENTAL_ROLES: frozenset[RunnerRole] = frozenset({"challenger", "canary"})

OK = "ok"
SKIP_EXPIRED = "expired"
SKIP_CONSENT = "consent_denied"
SKIP_NO_RETURN_ADDRESS = "no_return_address"
# Not a rendezvous instance's prediction topic: a producer is made (and kept) per return
# address, so a task must not be able to name any topic it likes.
SKIP_BAD_RETURN_ADDRESS = "bad_return_address"


class ModelRunner:
    """A Component: one consumer of the objective's tasks for one model deployment."""

    def __init__(
        self, settings: RunnerSettings, bus: Bus | None = None, *, hosted: bool = False
    ) -> None:
        if settings.role is None:
            raise ValueError("a model runner serves one deployment: its role is required")
        self.settings = settings
        self._owns_bus = bus is None
        self._bus = bus
        # Hosted by a RunnerHost: the host serves health and writes the ready file.
        self._hosted = hosted
        self._role = ROLES[settings.role]
        self._experimental = settings.role in EXPERIMENTAL_ROLES
        self._topics = Topics(settings.pulsar.tenant_namespace)
        self._tracer = tracer(__name__)
        # Made in start(): grpc.aio objects belong to the loop they are made on.
        self._channel: grpc.aio.Channel | None = None
        self._stub: model_pb2_grpc.ModelServiceAsyncStub | None = None
        self._server: GrpcServer | None = None
        self._subscription: Subscription[task_pb2.EnrichedTask] | None = None
        self._consumer: BoundedConsumer[task_pb2.EnrichedTask] | None = None
        self._stopping = False
        # Until the model answers PredictBatch with UNIMPLEMENTED.
        self._batch_capable = True
        self._batch_size = BATCH_SIZE.labels(settings.model)
        model = settings.model
        self._skipped = {
            reason: SKIPPED.labels(model, reason)
            for reason in (
                SKIP_EXPIRED,
                SKIP_CONSENT,
                SKIP_NO_RETURN_ADDRESS,
                SKIP_BAD_RETURN_ADDRESS,
            )
        }

    @property
    def endpoint(self) -> str:
        """Where the runner's health service listens."""
        return self._server.endpoint if self._server is not None else ""

    @property
    def instance(self) -> str:
        return self.settings.instance

    async def start(self) -> None:
        settings = self.settings
        if self._bus is None:
            self._bus = connect(settings.pulsar, f"runner-{settings.model}")
        bus = self._bus
        self._channel = grpc.aio.insecure_channel(
            settings.endpoint,
            options=[
                ("grpc.initial_reconnect_backoff_ms", settings.initial_reconnect_backoff_ms),
                ("grpc.max_reconnect_backoff_ms", settings.max_reconnect_backoff_ms),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ],
        )
        self._stub = model_pb2_grpc.ModelServiceStub(self._channel)
        if not self._hosted:
            self._server = GrpcServer(
                service_names=[],
                registrars=[],
                tcp_address=settings.listen,
                max_message_bytes=settings.max_message_bytes,
            )
        topic = bus.topics.tasks(settings.objective)
        self._subscription = await bus.subscribe(
            topic,
            settings.subscription,
            task_pb2.EnrichedTask,
            mode=SubscriptionMode.SHARED,
            start=settings.start_position,
        )
        if self._server is not None:
            await self._server.start()
        self._consumer = BoundedConsumer(
            self._subscription,
            burst_handler=self._handle_burst,
            max_burst=settings.max_batch,
            max_bursts_in_flight=settings.max_calls_in_flight,
            max_in_flight=settings.concurrency,
            retry_delay_s=settings.receive_retry_s,
            name="runner-receive",
            on_receive_error=self._receive_failed,
        )
        self._consumer.start()
        if self._server is not None:
            await self._server.set_serving(True)
            write_ready_file(
                self.settings.ready_file,
                endpoint=self.endpoint,
                model=self.settings.model,
                topic=topic,
                subscription=self.settings.subscription,
            )
        log.info(
            "runner subscribed",
            extra={
                "topic": topic,
                "subscription": self.settings.subscription,
                "model": self.settings.model,
                "model_endpoint": self.settings.endpoint,
                "health_endpoint": self.endpoint,
            },
        )

    async def stop(self) -> None:
        """Stop receiving, let in-flight tasks finish (bounded), then close everything."""
        if self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            await self._server.set_serving(False)
        if self._consumer is not None:
            # Tasks still unfinished after the grace are cancelled unacknowledged, so the
            # broker hands them to another replica.
            await self._consumer.stop(self.settings.shutdown_grace_s)
        if self._subscription is not None:
            await self._subscription.close()
        if self._owns_bus and self._bus is not None:
            await self._bus.close()
        if self._channel is not None:
            await self._channel.close()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)

    # ------------------------------------------------------------------ receiving

    def _receive_failed(self, _: Exception) -> None:
        # A receive that fails because the runner is stopping is not a bus error.
        if self._stopping:
            return
        RECEIVE_ERRORS.labels(self.settings.model).inc()
        log.exception("receive failed", extra={"model": self.settings.model})

    # ------------------------------------------------------------------ a burst of tasks

    async def _handle_burst(self, envelopes: list[Envelope[task_pb2.EnrichedTask]]) -> None:
        settled: set[int] = set()
        try:
            await self._process_burst(envelopes, settled)
        except Exception:
            # A bug must not strand tasks unacknowledged: redeliver them (and after
            # max_redeliveries the broker dead-letters them).
            log.exception("tasks failed", extra={"model": self.settings.model})
            for index, envelope in enumerate(envelopes):
                if index not in settled:
                    await self._settle(envelope, ack=False)

    async def _process_burst(
        self, envelopes: list[Envelope[task_pb2.EnrichedTask]], settled: set[int]
    ) -> None:
        received_ns = time.time_ns()
        first = envelopes[0]
        links = [
            trace.Link(span_context)
            for envelope in envelopes[1:]
            if (
                span_context := trace.get_current_span(envelope.trace_context()).get_span_context()
            ).is_valid
        ]
        with self._tracer.start_as_current_span(
            "runner.tasks",
            context=first.trace_context(),
            kind=trace.SpanKind.CONSUMER,
            links=links,
            attributes={
                "rdv.model": self.settings.model,
                "rdv.objective": self._objective(first.message.task),
                "rdv.batch_size": len(envelopes),
            },
        ):
            ready: list[int] = []
            for index, envelope in enumerate(envelopes):
                skip = self._skip_reason(envelope.message.task, received_ns)
                if skip is None:
                    ready.append(index)
                    continue
                self._skipped[skip].inc()
                settled.add(index)
                await self._settle(envelope, ack=True)
            if not ready:
                return
            events = await self._predict_all([envelopes[i].message for i in ready], received_ns)
            # Published in the same turn of the loop: they leave as one batch.
            await asyncio.gather(
                *(
                    self._publish(envelopes[i], event)
                    for i, event in zip(ready, events, strict=True)
                )
            )
            settled.update(ready)

    async def _publish(
        self, envelope: Envelope[task_pb2.EnrichedTask], event: task_pb2.PredictionEvent
    ) -> None:
        task = envelope.message.task
        try:
            assert self._bus is not None
            publisher = await self._bus.publisher(task.return_address, task_pb2.PredictionEvent)
            await publisher.publish(
                event, key=event.request_id, timeout=self.settings.publish_timeout_s
            )
        except Exception:
            PUBLISH_FAILURES.labels(self.settings.model).inc()
            log.warning(
                "publishing a prediction failed; the task will be redelivered",
                exc_info=True,
                extra={"request_id": event.request_id, "return_address": task.return_address},
            )
            await self._settle(envelope, ack=False)
            return
        PUBLISHED.labels(self.settings.model, event.WhichOneof("result") or "").inc()
        await self._settle(envelope, ack=True)

    def _objective(self, task: task_pb2.ScoringTask) -> str:
        return task.request.objective or self.settings.objective

    def _skip_reason(self, task: task_pb2.ScoringTask, now_ns: int) -> str | None:
        if task.HasField("deadline") and seconds_until(task.deadline, now_ns) <= 0:
            return SKIP_EXPIRED
        if (
            self._experimental
            and task.request.consent.experimentation == common_pb2.CONSENT_DECISION_DENIED
        ):
            return SKIP_CONSENT
        if not task.return_address:
            return SKIP_NO_RETURN_ADDRESS
        if not self._topics.is_return_address(task.return_address):
            return SKIP_BAD_RETURN_ADDRESS
        return None

    def _timeout_s(self, task: task_pb2.ScoringTask) -> float:
        ceiling = self.settings.max_model_timeout_s
        if not task.HasField("deadline"):
            return ceiling
        return max(0.0, min(ceiling, seconds_until(task.deadline)))

    def _request(self, enriched: task_pb2.EnrichedTask) -> model_pb2.PredictRequest:
        task = enriched.task
        request = model_pb2.PredictRequest(
            request_id=task.request.request_id,
            objective=self._objective(task),
            features=task.request.features,
            subject_state=enriched.subject_state,
        )
        if task.request.HasField("payload"):
            request.payload.CopyFrom(task.request.payload)
        if task.HasField("deadline"):
            request.deadline.CopyFrom(task.deadline)
        return request

    def _event(self, task: task_pb2.ScoringTask, received_ns: int) -> task_pb2.PredictionEvent:
        return task_pb2.PredictionEvent(
            request_id=task.request.request_id,
            mailbox_id=task.mailbox_id,
            objective=self._objective(task),
            model=self.settings.model,
            model_version=self.settings.model_version,
            role=self._role,
            task_received_time=timestamp_from_ns(received_ns),
            runner=self.settings.instance,
        )

    def _fill(
        self,
        event: task_pb2.PredictionEvent,
        result: model_pb2.PredictResponse | common_pb2.ModelError,
        elapsed: float,
    ) -> None:
        """Put the model's answer or error into the event and count it."""
        if isinstance(result, model_pb2.PredictResponse):
            outcome = OK
            event.prediction.SetInParent()
            event.prediction.score = result.score
            event.prediction.outputs.MergeFrom(result.outputs)
            if result.model_version:
                event.model_version = result.model_version
        else:
            outcome = result.reason
            result.message = result.message[: self.settings.max_error_message_chars]
            event.error.CopyFrom(result)
            MODEL_ERRORS.labels(self.settings.model, outcome).inc()
        event.predicted_time.CopyFrom(timestamp_from_ns(time.time_ns()))
        event.model_latency.CopyFrom(duration_from_seconds(elapsed))
        MODEL_LATENCY.labels(self.settings.model, outcome).observe(elapsed)

    async def _predict_all(
        self, tasks: list[task_pb2.EnrichedTask], received_ns: int
    ) -> list[task_pb2.PredictionEvent]:
        """One event per task: one PredictBatch call for several tasks when the model
        has it, else one Predict call per task, concurrently."""
        if len(tasks) > 1 and self._batch_capable:
            events = await self._predict_batch(tasks, received_ns)
            if events is not None:
                self._batch_size.observe(len(tasks))
                return events
        for _ in tasks:
            self._batch_size.observe(1)
        return list(await asyncio.gather(*(self._predict(t, received_ns) for t in tasks)))

    async def _predict_batch(
        self, tasks: list[task_pb2.EnrichedTask], received_ns: int
    ) -> list[task_pb2.PredictionEvent] | None:
        """The events, or None when the model has no PredictBatch (remembered)."""
        stub = self._stub
        assert stub is not None
        batch = model_pb2.PredictBatchRequest(requests=[self._request(t) for t in tasks])
        # The call lives as long as the longest budget; each item carries its own deadline.
        timeout = max(self._timeout_s(t.task) for t in tasks)
        started = time.perf_counter()
        try:
            response = await stub.PredictBatch(
                batch, timeout=timeout, metadata=tuple(inject().items())
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._batch_capable = False
                log.info("the model has no PredictBatch: one Predict call per task from now")
                return None
            error = self._call_error(err)
            results: list[model_pb2.PredictResponse | common_pb2.ModelError] = [error] * len(tasks)
        except Exception as exc:
            results = [self._internal_error(exc)] * len(tasks)
        else:
            results = [
                item.response if item.WhichOneof("result") == "response" else item.error
                for item in response.results
            ]
            if len(results) != len(tasks):
                # A model that breaks the contract: no task gets another task's answer.
                wrong = common_pb2.ModelError(
                    grpc_code=grpc.StatusCode.INTERNAL.value[0],
                    reason=grpc.StatusCode.INTERNAL.name,
                    message=f"runner: {len(results)} results for {len(tasks)} requests",
                )
                results = [wrong] * len(tasks)
        elapsed = time.perf_counter() - started
        events = []
        for enriched, result in zip(tasks, results, strict=True):
            event = self._event(enriched.task, received_ns)
            self._fill(event, result, elapsed)
            events.append(event)
        return events

    async def _predict(
        self, enriched: task_pb2.EnrichedTask, received_ns: int
    ) -> task_pb2.PredictionEvent:
        event = self._event(enriched.task, received_ns)
        stub = self._stub
        assert stub is not None
        started = time.perf_counter()
        result: model_pb2.PredictResponse | common_pb2.ModelError
        try:
            result = await stub.Predict(
                self._request(enriched),
                timeout=self._timeout_s(enriched.task),
                metadata=tuple(inject().items()),
            )
        except grpc.aio.AioRpcError as err:
            result = self._call_error(err)
        except Exception as exc:
            result = self._internal_error(exc)
        self._fill(event, result, time.perf_counter() - started)
        return event

    @staticmethod
    def _call_error(err: grpc.aio.AioRpcError) -> common_pb2.ModelError:
        code = err.code()
        return common_pb2.ModelError(
            grpc_code=code.value[0], reason=code.name, message=err.details() or ""
        )

    @staticmethod
    def _internal_error(exc: Exception) -> common_pb2.ModelError:
        # Not a status from the model (e.g. the channel is closing): still an answer.
        internal = grpc.StatusCode.INTERNAL
        return common_pb2.ModelError(
            grpc_code=internal.value[0],
            reason=internal.name,
            message=f"runner: {type(exc).__name__}",
        )

    async def _settle(self, envelope: Envelope[task_pb2.EnrichedTask], *, ack: bool) -> None:
        subscription = self._subscription
        assert subscription is not None
        try:
            if ack:
                await subscription.ack(envelope)
            else:
                await subscription.nack(envelope)
        except Exception:
            # The broker redelivers what it did not see acknowledged: a duplicate, not a loss.
            log.warning("ack/nack failed", exc_info=True, extra={"model": self.settings.model})


class RunnerHost:
    """A Component: several deployments' runners in one process.

    Each keeps its own subscription, model channel and batches; they share the Pulsar
    client (one I/O thread), the event loop and one health server. On a small machine
    that is fewer processes to wake per task: the objective's models all get the same
    task at the same moment.
    """

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self._bus: Bus | None = None
        self.runners: list[ModelRunner] = []
        self._server: GrpcServer | None = None

    @property
    def endpoint(self) -> str:
        return self._server.endpoint if self._server is not None else ""

    async def start(self) -> None:
        settings = self.settings
        self._bus = connect(settings.pulsar, f"runner-host-{settings.instance}")
        self._server = GrpcServer(
            service_names=[],
            registrars=[],
            tcp_address=settings.listen,
            max_message_bytes=settings.max_message_bytes,
        )
        await self._server.start()
        self.runners = [ModelRunner(s, self._bus, hosted=True) for s in settings.hosted()]
        for runner in self.runners:
            await runner.start()
        await self._server.set_serving(True)
        write_ready_file(
            settings.ready_file,
            endpoint=self.endpoint,
            models=[runner.settings.model for runner in self.runners],
        )

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.set_serving(False)
        for runner in self.runners:
            await runner.stop()
        if self._bus is not None:
            await self._bus.close()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)


def main() -> None:
    # objective, model, role and endpoint (or deployments) come from the environment or YAML.
    settings = RunnerSettings()
    if settings.deployments:
        run("runner", settings, lambda: RunnerHost(settings))
    else:
        run("runner", settings, lambda: ModelRunner(settings))
