"""The decoy component: the tasks topic in, the archive topic out.

It subscribes like a model (SHARED subscription, so replicas split the work) and never
answers. Unlike a model runner it does not skip expired tasks: the archive is the audit
and replay record of everything accepted, so every task is archived, late or not. A task
is acknowledged only after its record is on the archive topic; a failed publish is
negatively acknowledged and Pulsar redelivers it; a task archived already that comes again
is acknowledged without a second record (`services.decoy.archive`).

The decoy needs nothing from the control topic: the rendezvous applies the objective's live
configuration to each task under the version that decided it, resolving the default consent
into the task and marking a task outside `Sampling.archive_fraction` with `skip_archive`,
which the `Archiver` honours (acknowledged, not archived). `default_archiving` (or the mesh
file) only matters for a task whose archiving consent is still unspecified.

The local mesh hosts the decoy in the objective's runner host (`RunnerSettings.archive`),
which receives each task once for its models and the archive; this process is the decoy
on its own, for a deployment that scales the archive apart from the models.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from rendezvous.v1 import task_pb2

from services.core.bus import Bus, Envelope, Subscription, SubscriptionMode
from services.core.consumer import BoundedConsumer
from services.core.lifecycle import Component, run
from services.core.mesh import load_mesh
from services.core.privacy import Sealer
from services.decoy.archive import Archiver
from services.decoy.settings import DecoySettings

log = logging.getLogger(__name__)


def default_archiving_denied(settings: DecoySettings) -> bool:
    """What an unspecified archiving consent means: the mesh file's objective, else settings."""
    if settings.mesh_file is not None:
        entry = load_mesh(settings.mesh_file).objectives.get(settings.objective)
        if entry is not None:
            return entry.default_consent.archiving == "denied"
    return settings.default_archiving == "denied"


class DecoyComponent(Component):
    """One decoy process. Pass `bus` to run on a given bus (tests); else it connects."""

    def __init__(self, settings: DecoySettings, bus: Bus | None = None) -> None:
        super().__init__(settings, name=f"decoy-{settings.instance}", bus=bus)
        self.settings: DecoySettings = settings
        self.objective = settings.objective
        self._default_denied = default_archiving_denied(settings)
        self.archiver: Archiver | None = None
        self._subscription: Subscription[task_pb2.EnrichedTask] | None = None

    @property
    def archived(self) -> int:
        return self.archiver.archived if self.archiver is not None else 0

    @property
    def dead_lettered(self) -> int:
        return self._subscription.dead_lettered if self._subscription is not None else 0

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        bus = self.bus
        # Held: a record waits in the client for the broker (one per task in flight at most).
        publisher = await bus.publisher(
            bus.topics.archive(self.objective),
            task_pb2.ArchiveRecord,
            hold=self.settings.max_in_flight,
        )
        sealer = Sealer(self.settings.privacy, self.settings.tls)
        stack.push_async_callback(sealer.close)
        self.archiver = Archiver(
            publisher,
            self.objective,
            default_denied=self._default_denied,
            remember=self.settings.remember_archived,
            sealer=sealer,
        )
        # "earliest" only matters when the subscription is first created: tasks published
        # before any decoy ran are archived too.
        subscription = await bus.subscribe(
            bus.topics.tasks(self.objective),
            self.settings.subscription,
            task_pb2.EnrichedTask,
            mode=SubscriptionMode.SHARED,
            start="earliest",
        )
        self._subscription = subscription
        stack.push_async_callback(subscription.close)
        consumer = BoundedConsumer(
            subscription,
            burst_handler=self._archive,
            max_in_flight=self.settings.max_in_flight,
            retry_delay_s=self.settings.retry_delay_s,
            name="decoy:tasks",
            on_receive_error=self._receive_failed,
            max_burst=self.settings.max_in_flight,
        )
        consumer.start()
        stack.push_async_callback(consumer.stop, self.settings.shutdown_grace_s)

    def facts(self) -> dict[str, Any]:
        return {"objective": self.objective}

    def _receive_failed(self, _: Exception) -> None:
        log.exception("receiving tasks failed", extra={"objective": self.objective})

    async def _archive(self, envelopes: list[Envelope[task_pb2.EnrichedTask]]) -> None:
        archiver, subscription = self.archiver, self._subscription
        assert archiver is not None and subscription is not None  # opened before consuming
        archived = await archiver.archive(envelopes)
        for envelope, ok in zip(envelopes, archived, strict=True):
            try:
                if ok:
                    await subscription.ack(envelope)
                else:
                    await subscription.nack(envelope)
            except Exception:
                # An ack or nack to a broker that went away: Pulsar redelivers what was not acked.
                log.warning("ack/nack failed", exc_info=True, extra={"objective": self.objective})


def main() -> None:
    # `objective` is required and comes from the environment or the YAML file.
    settings = DecoySettings()  # type: ignore[call-arg]
    run("decoy", settings, lambda: DecoyComponent(settings))
