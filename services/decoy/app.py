"""The decoy component: the tasks topic in, the archive topic out.

It subscribes like a model (SHARED subscription, so replicas split the work) and never
answers. Unlike a model runner it does not skip expired tasks: the archive is the audit
and replay record of everything accepted, so every task is archived, late or not. A task
is acknowledged only after its record is on the archive topic; a failed publish is
negatively acknowledged and Pulsar redelivers it. Each task is handled in its own asyncio
task, at most `max_in_flight` at once. The gRPC server carries only health and
reflection (SERVING once the subscription exists).
"""

from __future__ import annotations

import logging

from opentelemetry import trace
from rendezvous.v1 import task_pb2

from services.core.bus import (
    Bus,
    BusError,
    Envelope,
    Publisher,
    Subscription,
    SubscriptionMode,
    connect,
)
from services.core.consumer import BoundedConsumer
from services.core.mesh import load_mesh
from services.core.server import GrpcServer, run, write_ready_file
from services.core.telemetry import counter, tracer
from services.decoy.archive import archive_record
from services.decoy.settings import DecoySettings

log = logging.getLogger(__name__)

ARCHIVED = counter(
    "rdv_decoy_archived",
    "Tasks the decoy put on the archive topic",
    ("objective", "features_dropped"),
)
ARCHIVE_FAILURES = counter(
    "rdv_decoy_archive_failures",
    "Tasks whose archive publish failed (negatively acknowledged for redelivery)",
    ("objective",),
)

_tracer = tracer(__name__)


def default_archiving_denied(settings: DecoySettings) -> bool:
    """What an unspecified archiving consent means: the mesh file's objective, else settings."""
    if settings.mesh_file is not None:
        entry = load_mesh(settings.mesh_file).objectives.get(settings.objective)
        if entry is not None:
            return entry.default_consent.archiving == "denied"
    return settings.default_archiving == "denied"


class DecoyComponent:
    """One decoy process. Pass `bus` to run on a given bus (tests); else it connects."""

    def __init__(self, settings: DecoySettings, bus: Bus | None = None) -> None:
        self.settings = settings
        self.objective = settings.objective
        self._default_denied = default_archiving_denied(settings)
        self._bus = bus
        self._owns_bus = bus is None
        # Built in start(): a grpc.aio server binds to the running loop, and `run` builds
        # components before its loop starts.
        self._server: GrpcServer | None = None
        self._subscription: Subscription[task_pb2.EnrichedTask] | None = None
        self._publisher: Publisher[task_pb2.ArchiveRecord] | None = None
        self._consumer: BoundedConsumer[task_pb2.EnrichedTask] | None = None
        self.archived = 0

    @property
    def server(self) -> GrpcServer:
        if self._server is None:
            raise RuntimeError("the decoy has not started")
        return self._server

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def dead_lettered(self) -> int:
        return self._subscription.dead_lettered if self._subscription is not None else 0

    async def start(self) -> None:
        self._server = GrpcServer(
            service_names=[],
            registrars=[],
            tcp_address=self.settings.listen,
            max_message_bytes=self.settings.max_message_bytes,
        )
        await self.server.start()
        await self.server.set_serving(False)
        if self._bus is None:
            self._bus = connect(self.settings.pulsar, f"decoy-{self.settings.instance}")
        topics = self._bus.topics
        # "earliest" only matters when the subscription is first created: tasks published
        # before any decoy ran are archived too.
        self._subscription = await self._bus.subscribe(
            topics.tasks(self.objective),
            self.settings.subscription,
            task_pb2.EnrichedTask,
            mode=SubscriptionMode.SHARED,
            start="earliest",
        )
        self._publisher = await self._bus.publisher(
            topics.archive(self.objective), task_pb2.ArchiveRecord
        )
        subscription = self._subscription
        self._consumer = BoundedConsumer(
            subscription,
            lambda envelope: self._archive(subscription, envelope),
            max_in_flight=self.settings.max_in_flight,
            retry_delay_s=self.settings.retry_delay_s,
            name="decoy:tasks",
            on_receive_error=self._receive_failed,
            max_burst=self.settings.max_in_flight,
        )
        self._consumer.start()
        await self.server.set_serving(True)
        write_ready_file(self.settings.ready_file, endpoint=self.endpoint, objective=self.objective)
        log.info("decoy serving", extra={"endpoint": self.endpoint, "objective": self.objective})

    def _receive_failed(self, _: Exception) -> None:
        topic = self._subscription.topic if self._subscription is not None else ""
        log.exception("receiving tasks failed", extra={"topic": topic})

    async def _archive(
        self,
        subscription: Subscription[task_pb2.EnrichedTask],
        envelope: Envelope[task_pb2.EnrichedTask],
    ) -> None:
        publisher = self._publisher
        assert publisher is not None
        task = envelope.message
        request_id = task.task.request.request_id
        try:
            with _tracer.start_as_current_span(
                "decoy.archive",
                context=envelope.trace_context(),
                kind=trace.SpanKind.CONSUMER,
                attributes={"rdv.objective": self.objective, "rdv.request_id": request_id},
            ) as span:
                record = archive_record(task, default_denied=self._default_denied)
                try:
                    await publisher.publish(
                        record,
                        key=request_id or None,
                        timeout=self.settings.pulsar.send_timeout_s,
                    )
                except BusError as exc:
                    span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
                    ARCHIVE_FAILURES.labels(self.objective).inc()
                    log.warning(
                        "archiving a task failed; redelivery requested",
                        extra={"topic": publisher.topic, "error": type(exc).__name__},
                    )
                    await subscription.nack(envelope)
                    return
                await subscription.ack(envelope)
            self.archived += 1
            ARCHIVED.labels(self.objective, str(record.features_dropped).lower()).inc()
        except Exception:
            # An ack or nack to a broker that went away: Pulsar redelivers what was not acked.
            log.exception("archiving a task failed", extra={"topic": subscription.topic})

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.set_serving(False)
        if self._consumer is not None:
            await self._consumer.stop(self.settings.shutdown_grace_s)
            self._consumer = None
        if self._subscription is not None:
            await self._subscription.close()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)
        if self._owns_bus and self._bus is not None:
            await self._bus.close()


def main() -> None:
    # `objective` is required and comes from the environment or the YAML file.
    settings = DecoySettings()  # type: ignore[call-arg]
    run("decoy", settings, lambda: DecoyComponent(settings))
