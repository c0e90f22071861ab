"""The enricher component: events followers, request pipelines and the gRPC service.

Start order (the common lifecycle, `services.core.lifecycle`): the gRPC server listens
(health NOT_SERVING), each objective's events reader and request subscription are created,
the readers replay their topics from the earliest message, and only once every reader has
caught up do the request pipelines start, health turn SERVING and the ready file appear.
Until then Enrich answers UNAVAILABLE, so no model ever sees a state built from half the
events. Stop order: NOT_SERVING, stop receiving, let in-flight tasks finish (shutdown
grace), stop reading events, close the subscriptions, stop the server, close the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from services.core.bus import Bus
from services.core.lifecycle import Component, cancel_and_wait, run
from services.core.mesh import load_mesh
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


class EnricherComponent(Component):
    """One enricher process. Pass `bus` to run on a given bus (tests); else it connects."""

    def __init__(self, settings: EnricherSettings, bus: Bus | None = None) -> None:
        self.objectives = resolve_objectives(settings)
        self.store = SubjectStore(
            settings.max_subjects, settings.max_events_per_subject, settings.max_kinds_per_subject
        )
        self.enricher = Enricher(self.objectives, self.store)
        # Enrich answers UNAVAILABLE until every events reader has caught up.
        self._caught_up = False
        super().__init__(
            settings,
            name=f"enricher-{settings.instance}",
            bus=bus,
            service_names=[SERVICE_NAME],
            registrars=[registrar(EnricherServicer(self.enricher, lambda: self._caught_up))],
        )
        self.settings: EnricherSettings = settings
        self.followers: list[EventFollower] = []
        self.pipelines: list[TaskPipeline] = []

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        """Returns once the state has caught up and tasks flow."""
        bus = self.bus
        for objective in self.objectives:
            follower = EventFollower(bus, objective, self.enricher, self.settings.retry_delay_s)
            await follower.open()
            stack.push_async_callback(follower.close)
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
            stack.push_async_callback(pipeline.close)
            self.pipelines.append(pipeline)
        readers = [
            self.watch(asyncio.create_task(follower.run(), name=f"events:{follower.objective}"))
            for follower in self.followers
        ]
        stack.push_async_callback(cancel_and_wait, readers)
        await asyncio.gather(*(follower.caught_up.wait() for follower in self.followers))
        for pipeline in self.pipelines:
            await pipeline.start()
        self._caught_up = True

    def facts(self) -> dict[str, Any]:
        return {"objectives": self.objectives, "subjects": len(self.store)}

    async def drain(self) -> None:
        self._caught_up = False
        # Together: every pipeline stops receiving at once, and the grace runs for all at once.
        await asyncio.gather(
            *(pipeline.stop(self.settings.shutdown_grace_s) for pipeline in self.pipelines)
        )


def main() -> None:
    settings = EnricherSettings()
    run("enricher", settings, lambda: EnricherComponent(settings))
