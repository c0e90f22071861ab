"""The enricher component: events followers, request pipelines and the gRPC service.

Start order (the common lifecycle, `services.core.lifecycle`): the gRPC server listens
(health NOT_SERVING), the erasure topic is read to its end (given the mesh's pseudonym key,
`privacy.pseudonym_key_file`; then followed live), each objective's events reader and
request subscription are created, the readers replay their topics from the earliest
message, and only once every reader has caught up do the request pipelines start, health
turn SERVING and the ready file appear.
Until then Enrich answers UNAVAILABLE, so no model ever sees a state built from half the
events. Stop order: NOT_SERVING, stop receiving, let in-flight tasks finish (shutdown
grace), stop reading events, close the subscriptions, stop the server, close the bus.

Objectives come from `objectives` (or the mesh file) and stay fixed, or, with `follow` (how
the supervisor runs it), from the control topic: every objective whose enrichment is not
NONE is served, and that set follows the topic live. A newly enriched objective gets its
events reader and, once that has caught up, its request pipeline; an objective whose
enrichment became NONE has its pipeline stopped (in-flight tasks finish) and its reader
closed. Health turns SERVING once the objectives enriched at start have caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from rendezvous.v1 import keyring_pb2, objective_pb2

from services.core.bus import Bus
from services.core.control_topic import follow
from services.core.lifecycle import Component, cancel_and_wait, run
from services.core.mesh import load_mesh
from services.core.privacy import ErasureFollower, Pseudonyms, read_key_file
from services.enricher.enrich import Enricher
from services.enricher.follower import EventFollower
from services.enricher.pipeline import TaskPipeline
from services.enricher.service import SERVICE_NAME, EnricherServicer, registrar
from services.enricher.settings import EnricherSettings
from services.enricher.store import SubjectStore

log = logging.getLogger(__name__)


def resolve_objectives(settings: EnricherSettings) -> list[str]:
    """The configured objectives, else every objective of the mesh file that is enriched
    (none yet when following the control topic)."""
    if settings.objectives:
        return list(dict.fromkeys(settings.objectives))
    if settings.mesh_file is not None:
        mesh = load_mesh(settings.mesh_file)
        return [name for name, entry in mesh.objectives.items() if entry.enriched]
    if settings.follow:
        return []
    raise ValueError(
        "the enricher needs `objectives`, a `mesh_file` or `follow` to know what to serve"
    )


def enriched(config: objective_pb2.ObjectiveConfig) -> bool:
    """Whether the objective's tasks pass through the enricher (UNSPECIFIED reads as yes)."""
    return config.enrichment != objective_pb2.ENRICHMENT_NONE


class _Served:
    """One objective's events reader (and its task) and request pipeline."""

    def __init__(self, follower: EventFollower, reader: asyncio.Task[None], pipeline: TaskPipeline):
        self.follower = follower
        self.reader = reader
        self.pipeline = pipeline


class EnricherComponent(Component):
    """One enricher process. Pass `bus` to run on a given bus (tests); else it connects."""

    def __init__(self, settings: EnricherSettings, bus: Bus | None = None) -> None:
        self.objectives = resolve_objectives(settings)
        self.store = SubjectStore(
            settings.max_subjects, settings.max_events_per_subject, settings.max_kinds_per_subject
        )
        privacy = settings.privacy
        # Erasures are followed whenever subjects can be matched to them (the pseudonym key).
        self.pseudonyms = (
            Pseudonyms(read_key_file(privacy.pseudonym_key_file, "pseudonym key"))
            if privacy.pseudonym_key_file is not None
            else None
        )
        self.enricher = Enricher(self.objectives, self.store, self.pseudonyms)
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
        self._served: dict[str, _Served] = {}
        # Live changes are applied one at a time, in the order of the versions.
        self._change_lock = asyncio.Lock()

    @property
    def followers(self) -> list[EventFollower]:
        return [served.follower for served in self._served.values()]

    @property
    def pipelines(self) -> list[TaskPipeline]:
        return [served.pipeline for served in self._served.values()]

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        """Returns once the state has caught up and tasks flow."""
        stack.push_async_callback(self._close_all)
        if self.pseudonyms is not None:
            # Before any event is read: an erased subject's events are skipped, not kept
            # and then dropped.
            erasures = ErasureFollower(self.bus, self._erase, self.settings.retry_delay_s)
            await erasures.open()
            stack.push_async_callback(erasures.close)
            reading = self.watch(asyncio.create_task(erasures.run(), name="enricher:erasures"))
            stack.push_async_callback(cancel_and_wait, [reading])
            await erasures.caught_up.wait()
        objectives = self.objectives
        control = None
        if self.settings.follow:
            control = await follow(
                self.bus,
                stack,
                self.watch,
                retry_delay_s=self.settings.retry_delay_s,
                objectives=self.settings.serve_only or None,
            )
            objectives = [name for name, config in control.configs.items() if enriched(config)]
        served = [await self._open_objective(objective) for objective in objectives]
        await asyncio.gather(*(s.follower.caught_up.wait() for s in served))
        for one in served:
            await one.pipeline.start()
        self._caught_up = True
        if control is not None:
            control.listen(self._changed)
            # Versions that came while the readers caught up: applied now.
            for config in list(control.configs.values()):
                await self._changed(None, config)

    def _erase(self, erasure: keyring_pb2.Erasure, _publish_time_ms: int) -> None:
        dropped = self.enricher.erase(erasure)
        log.info(
            "erasure applied",
            extra={
                "pseudonym": erasure.pseudonym,
                "objective": erasure.objective or "*",
                "states_dropped": dropped,
            },
        )

    async def _open_objective(self, objective: str) -> _Served:
        """Its events reader running and its request subscription made (tasks wait there)."""
        bus = self.bus
        follower = EventFollower(bus, objective, self.enricher, self.settings.retry_delay_s)
        await follower.open()
        reader = self.watch(asyncio.create_task(follower.run(), name=f"events:{objective}"))
        pipeline = TaskPipeline(
            bus,
            objective,
            self.enricher,
            subscription=self.settings.subscription,
            max_in_flight=self.settings.max_in_flight,
            retry_delay_s=self.settings.retry_delay_s,
            remember=self.settings.remember_published,
        )
        served = _Served(follower, reader, pipeline)
        self._served[objective] = served
        self.enricher.objectives.add(objective)
        self.objectives = sorted(self._served)
        await pipeline.open()
        return served

    async def _changed(
        self, _: objective_pb2.ObjectiveConfig | None, config: objective_pb2.ObjectiveConfig
    ) -> None:
        if self.stopping:
            return
        name = config.objective
        async with self._change_lock:
            if enriched(config) and name not in self._served:
                served = await self._open_objective(name)
                await served.follower.caught_up.wait()
                await served.pipeline.start()
                log.info("objective enriched from now on", extra={"objective": name})
            elif not enriched(config) and name in self._served:
                await self._close_objective(name, self.settings.shutdown_grace_s)
                log.info("objective no longer enriched", extra={"objective": name})

    async def _close_objective(self, objective: str, grace_s: float) -> None:
        served = self._served.pop(objective)
        self.enricher.objectives.discard(objective)
        self.objectives = sorted(self._served)
        await served.pipeline.stop(grace_s)
        await cancel_and_wait([served.reader])
        await served.follower.close()
        await served.pipeline.close()

    async def _close_all(self) -> None:
        for objective in list(self._served):
            await self._close_objective(objective, 0.0)

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
