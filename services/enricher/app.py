"""The enricher component: events followers, request pipelines and the gRPC service.

Start order: the gRPC server listens (health NOT_SERVING), each objective's events
reader and request subscription are created, the readers replay their topics from the
earliest message, and only once every reader has caught up do the request pipelines
start, health turn SERVING and the ready file appear. Until then Enrich answers
UNAVAILABLE, so no model ever sees a state built from half the events.
Stop order: NOT_SERVING, stop receiving, let in-flight tasks finish (shutdown grace),
stop reading events, stop the server, close the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.core.bus import Bus, connect
from services.core.mesh import load_mesh
from services.core.server import GrpcServer, run, write_ready_file
from services.enricher.enrich import Enricher
from services.enricher.follower import EventFollower
from services.enricher.pipeline import TaskPipeline
from services.enricher.service import SERVICE_NAME, EnricherServicer, registrar
from services.enricher.settings import EnricherSettings
from services.enricher.store import SubjectStore

log = logging.getLogger(__name__)


def resolve_objectives(settings: EnricherSettings) -> list[str]:
    """The configured objectives, else every objective of the mesh file that is enriched."""
    if settings.objectives:
        return list(dict.fromkeys(settings.objectives))
    if settings.mesh_file is not None:
        mesh = load_mesh(settings.mesh_file)
        return [name for name, entry in mesh.objectives.items() if entry.enriched]
    raise ValueError("the enricher needs `objectives` or a `mesh_file` to know what to serve")


class EnricherComponent:
    """One enricher process. Pass `bus` to run on a given bus (tests); else it connects."""

    def __init__(self, settings: EnricherSettings, bus: Bus | None = None) -> None:
        self.settings = settings
        self.objectives = resolve_objectives(settings)
        self.store = SubjectStore(
            settings.max_subjects, settings.max_events_per_subject, settings.max_kinds_per_subject
        )
        self.enricher = Enricher(self.objectives, self.store)
        self._bus = bus
        self._owns_bus = bus is None
        self._ready = False
        # Built in start(): a grpc.aio server binds to the running loop, and `run` builds
        # components before its loop starts.
        self._server: GrpcServer | None = None
        self.followers: list[EventFollower] = []
        self.pipelines: list[TaskPipeline] = []
        self._follower_tasks: list[asyncio.Task[None]] = []

    @property
    def server(self) -> GrpcServer:
        if self._server is None:
            raise RuntimeError("the enricher has not started")
        return self._server

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            self._bus = connect(self.settings.pulsar, f"enricher-{self.settings.instance}")
        return self._bus

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Returns once the state has caught up and tasks flow (health SERVING)."""
        self._server = GrpcServer(
            service_names=[SERVICE_NAME],
            registrars=[registrar(EnricherServicer(self.enricher, lambda: self._ready))],
            tcp_address=self.settings.listen,
            max_message_bytes=self.settings.max_message_bytes,
        )
        await self.server.start()
        await self.server.set_serving(False)
        bus = self.bus
        for objective in self.objectives:
            follower = EventFollower(bus, objective, self.enricher, self.settings.retry_delay_s)
            await follower.open()
            self.followers.append(follower)
            pipeline = TaskPipeline(
                bus,
                objective,
                self.enricher,
                subscription=self.settings.subscription,
                max_in_flight=self.settings.max_in_flight,
                send_timeout_s=self.settings.pulsar.send_timeout_s,
                retry_delay_s=self.settings.retry_delay_s,
            )
            await pipeline.open()
            self.pipelines.append(pipeline)
        self._follower_tasks = [
            asyncio.create_task(follower.run(), name=f"events:{follower.objective}")
            for follower in self.followers
        ]
        await asyncio.gather(*(follower.caught_up.wait() for follower in self.followers))
        for pipeline in self.pipelines:
            await pipeline.start()
        self._ready = True
        await self.server.set_serving(True)
        write_ready_file(
            self.settings.ready_file, endpoint=self.endpoint, objectives=self.objectives
        )
        log.info(
            "enricher serving",
            extra={
                "endpoint": self.endpoint,
                "objectives": ",".join(self.objectives),
                "subjects": len(self.store),
            },
        )

    async def stop(self) -> None:
        self._ready = False
        if self._server is not None:
            await self._server.set_serving(False)
        # Together: every pipeline stops receiving at once, and the grace runs for all at once.
        await asyncio.gather(
            *(pipeline.stop(self.settings.shutdown_grace_s) for pipeline in self.pipelines)
        )
        await _cancel(self._follower_tasks)
        for pipeline in self.pipelines:
            await pipeline.close()
        for follower in self.followers:
            await follower.close()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)
        if self._owns_bus and self._bus is not None:
            await self._bus.close()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()


def main() -> None:
    settings = EnricherSettings()
    run("enricher", settings, lambda: EnricherComponent(settings))
