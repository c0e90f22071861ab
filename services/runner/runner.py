"""One model deployment inside a runner host: admission, dynamic batching, publishing.

The host hands every burst of tasks it received to each of its runners. A runner skips
what admission rejects, queues the rest and scores them with at most `max_calls_in_flight`
model calls at once, each taking everything queued (up to `max_batch`): under light load a
call is one task, and tasks that arrive while calls are in flight make up the next batch.
Each runner batches on its own, so a slow model never holds up another one's predictions.
A runner the host removes live is drained (`drain`: its queued and in-flight calls finish)
before it is closed; a role or version change (`update`) applies to the next event.
A prediction (or the model's error) goes to the task's return address, keyed by request id;
the events of one call are published in one turn of the loop, so they leave as one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from opentelemetry import trace
from rendezvous.v1 import common_pb2, model_pb2, task_pb2

from services.core.bus import Bus, BusError, Envelope
from services.core.oip import OIP_KIND, OipArgs
from services.core.telemetry import counter, gauge, histogram, tracer
from services.core.topics import Topics
from services.runner.admission import SKIP_REASONS, skip_reason
from services.runner.events import Deployment, prediction_event
from services.runner.model_client import ChannelOptions, ModelClient, Scored, ScoringClient
from services.runner.oip_client import OipClient
from services.runner.settings import RunnerRole, RunnerSettings

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

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
MODEL_LATENCY = histogram(
    "rdv_runner_model_latency_seconds",
    "Duration of Predict calls as the runner saw them",
    ("model", "outcome"),
)
QUEUED = gauge(
    "rdv_runner_queued",
    "Tasks waiting for a model call (every call slot busy: max_calls_in_flight)",
    ("model",),
)
CALLS_IN_FLIGHT = gauge("rdv_runner_calls_in_flight", "Model calls in progress", ("model",))
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


@dataclass(slots=True)
class _Queued:
    envelope: Envelope[task_pb2.EnrichedTask]
    received_ns: int
    # True once its event is on the return address; False when the publish failed.
    published: asyncio.Future[bool] = field(repr=False)


def model_client(settings: RunnerSettings) -> ScoringClient:
    """The client of the deployment's model: the Open Inference Protocol's for kind `oip`
    (its args parsed here: a ValueError when they do not fit), else ModelService's."""
    options = ChannelOptions(
        initial_reconnect_backoff_ms=settings.initial_reconnect_backoff_ms,
        max_reconnect_backoff_ms=settings.max_reconnect_backoff_ms,
        max_message_bytes=settings.max_message_bytes,
        max_timeout_s=settings.max_model_timeout_s,
        tls=settings.tls,
    )
    if settings.kind == OIP_KIND:
        return OipClient(settings.endpoint, OipArgs.model_validate(settings.args), options)
    return ModelClient(settings.endpoint, options)


class ModelRunner:
    """One deployment: its model channel, its batches, its metrics."""

    def __init__(self, settings: RunnerSettings, bus: Bus) -> None:
        if settings.role is None:
            raise ValueError("a model runner serves one deployment: its role is required")
        self.settings = settings
        self.model = settings.model
        self._bus = bus
        self._topics = Topics(settings.pulsar.tenant_namespace)
        self._experimental = settings.role in EXPERIMENTAL_ROLES
        self.deployment = Deployment(
            objective=settings.objective,
            model=settings.model,
            model_version=settings.model_version,
            role=ROLES[settings.role],
            runner=settings.instance,
            max_error_message_chars=settings.max_error_message_chars,
        )
        self.client = model_client(settings)
        self._queue: list[_Queued] = []
        self._calls: set[asyncio.Task[None]] = set()
        # Labelled children looked up once: a label look-up per message adds up.
        self._skipped = {reason: SKIPPED.labels(self.model, reason) for reason in SKIP_REASONS}
        self._batch_size = BATCH_SIZE.labels(self.model)
        self._published = {
            outcome: PUBLISHED.labels(self.model, outcome) for outcome in ("prediction", "error")
        }
        self._publish_failures = PUBLISH_FAILURES.labels(self.model)
        self._closed = False
        # Read at scrape time: nothing on the task path.
        QUEUED.labels(self.model).set_function(lambda: len(self._queue))
        CALLS_IN_FLIGHT.labels(self.model).set_function(lambda: len(self._calls))

    def update(self, role: RunnerRole, model_version: str) -> None:
        """A new role or configured version, for every event from now on."""
        self._experimental = role in EXPERIMENTAL_ROLES
        self.deployment = dataclasses.replace(
            self.deployment, role=ROLES[role], model_version=model_version
        )

    @property
    def role(self) -> RunnerRole:
        return next(name for name, value in ROLES.items() if value == self.deployment.role)

    @property
    def calls_in_flight(self) -> int:
        return len(self._calls)

    async def handle(
        self, envelopes: list[Envelope[task_pb2.EnrichedTask]], received_ns: int
    ) -> list[bool]:
        """Per task: True once this deployment is done with it (published, or skipped),
        False when its prediction could not be published (the task is to be redelivered)."""
        loop = asyncio.get_running_loop()
        done = [True] * len(envelopes)
        if self._closed:
            # Removed from the host while this burst was on its way: no longer a scorer.
            return done
        queued: list[tuple[int, asyncio.Future[bool]]] = []
        for index, envelope in enumerate(envelopes):
            reason = skip_reason(
                envelope.message.task,
                received_ns,
                model=self.model,
                experimental=self._experimental,
                topics=self._topics,
            )
            if reason is not None:
                self._skipped[reason].inc()
                continue
            future: asyncio.Future[bool] = loop.create_future()
            self._queue.append(_Queued(envelope, received_ns, future))
            queued.append((index, future))
        self._start_calls()
        for index, future in queued:
            done[index] = await future
        return done

    def _start_calls(self) -> None:
        limit = self.settings.max_batch
        while self._queue and len(self._calls) < self.settings.max_calls_in_flight:
            batch, self._queue = self._queue[:limit], self._queue[limit:]
            call = asyncio.create_task(self._call(batch), name=f"runner:{self.model}")
            self._calls.add(call)
            call.add_done_callback(self._call_done)

    def _call_done(self, call: asyncio.Task[None]) -> None:
        self._calls.discard(call)
        if not call.cancelled() and call.exception() is not None:
            log.error("model call failed", exc_info=call.exception(), extra={"model": self.model})
        self._start_calls()

    async def _call(self, batch: list[_Queued]) -> None:
        try:
            first = batch[0].envelope
            links = [
                trace.Link(context)
                for queued in batch[1:]
                if (
                    context := trace.get_current_span(
                        queued.envelope.trace_context()
                    ).get_span_context()
                ).is_valid
            ]
            # Inside the first task's CONSUMER span (the host's); the others are linked, and
            # each prediction is published in its own task's trace (see _publish).
            with _tracer.start_as_current_span(
                "runner.predict",
                context=first.trace_context(),
                links=links,
                attributes={"rdv.model": self.model, "rdv.batch_size": len(batch)},
            ):
                scored = await self.client.score(
                    [q.envelope.message for q in batch],
                    first.message.task.request.objective or self.deployment.objective,
                )
                self._observe(scored)
                # Published in the same turn of the loop: they leave as one batch.
                outcomes = await asyncio.gather(
                    *(
                        self._publish(queued, result, scored.elapsed_s, first=index == 0)
                        for index, (queued, result) in enumerate(
                            zip(batch, scored.results, strict=True)
                        )
                    )
                )
            for queued, published in zip(batch, outcomes, strict=True):
                if not queued.published.done():
                    queued.published.set_result(published)
        finally:
            # Whatever happened (a bug, a cancel at stop): nothing waits forever, and a task
            # whose event was not published is redelivered.
            for queued in batch:
                if not queued.published.done():
                    queued.published.set_result(False)

    def _observe(self, scored: Scored) -> None:
        for size in scored.calls:
            self._batch_size.observe(size)
        for result in scored.results:
            if isinstance(result, model_pb2.PredictResponse):
                MODEL_LATENCY.labels(self.model, OK).observe(scored.elapsed_s)
            else:
                MODEL_ERRORS.labels(self.model, result.reason).inc()
                MODEL_LATENCY.labels(self.model, result.reason).observe(scored.elapsed_s)

    async def _publish(
        self,
        queued: _Queued,
        result: model_pb2.PredictResponse | common_pb2.ModelError,
        elapsed_s: float,
        *,
        first: bool,
    ) -> bool:
        task = queued.envelope.message.task
        event = prediction_event(
            self.deployment, task, result, received_ns=queued.received_ns, elapsed_s=elapsed_s
        )
        try:
            publisher = await self._bus.publisher(
                task.return_address,
                task_pb2.PredictionEvent,
                max_delay_ms=self.settings.prediction_linger_ms,
            )
            await publisher.publish(
                event,
                key=event.request_id,
                timeout=self.settings.publish_timeout_s,
                # The first task's under the model call's span; each other one in its own trace.
                context=None if first else queued.envelope.trace_context(),
            )
        except BusError as exc:
            self._publish_failures.inc()
            log.warning(
                "publishing a prediction failed; the task will be redelivered",
                extra={
                    "model": self.model,
                    "request_id": event.request_id,
                    "return_address": task.return_address,
                    "error": type(exc).__name__,
                },
            )
            return False
        if not task.warmup:
            self._published[event.WhichOneof("result") or "error"].inc()
        return True

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or in flight (at most `timeout_s`); True when idle."""
        deadline = time.monotonic() + timeout_s
        # A burst handed over just before the removal queues its tasks on its first step.
        await asyncio.sleep(0)
        while self._queue or self._calls:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._calls:
                await asyncio.wait(set(self._calls), timeout=remaining)
            else:
                self._start_calls()
                await asyncio.sleep(0)
        return True

    async def close(self) -> None:
        """Cancel calls still in flight (their tasks are redelivered) and close the channel."""
        self._closed = True
        for queued in self._queue:
            # Never called: redelivered rather than left waiting.
            if not queued.published.done():
                queued.published.set_result(False)
        self._queue.clear()
        for call in list(self._calls):
            call.cancel()
        for call in list(self._calls):
            with contextlib.suppress(asyncio.CancelledError):
                await call
        await self.client.close()
