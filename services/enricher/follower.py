"""Follows an objective's events topic into the subject state store.

Why a Reader from earliest and not a subscription: every enricher replica must see every
event (each keeps the full state), so a shared subscription is wrong, and an exclusive
subscription per replica (`enricher-events-<instance>`) would be a durable cursor named
after a per-process instance id: every restart or rescheduled pod would leave an orphan
subscription behind that pins the topic's backlog forever. A reader is a non-durable
cursor: nothing to clean up, each process rebuilds its state from the start of the topic
(as far as the namespace's retention keeps it), and `has_message_available` tells exactly
when the state has caught up with the topic. Losing the position on restart costs
nothing, as the state lives in memory anyway.
"""

from __future__ import annotations

import asyncio
import logging

from rendezvous.v1 import task_pb2

from services.core.bus import Bus, Reader
from services.enricher.enrich import Enricher

log = logging.getLogger(__name__)

# A long catch-up must not starve the gRPC server and health checks of the loop.
_YIELD_EVERY = 1000


class EventFollower:
    """Reads one objective's events topic, from the earliest message, forever."""

    def __init__(self, bus: Bus, objective: str, enricher: Enricher, retry_delay_s: float) -> None:
        self.bus = bus
        self.objective = objective
        self.topic = bus.topics.events(objective)
        self._enricher = enricher
        self._retry_delay_s = retry_delay_s
        self._reader: Reader[task_pb2.SubjectEvent] | None = None
        self.caught_up = asyncio.Event()
        self.read = 0

    async def open(self) -> None:
        self._reader = await self.bus.reader(self.topic, task_pb2.SubjectEvent, start="earliest")

    async def run(self) -> None:
        """Read until cancelled; `caught_up` is set once no older message is waiting."""
        if self._reader is None:
            await self.open()
        reader = self._reader
        assert reader is not None
        while True:
            try:
                if not self.caught_up.is_set() and not await reader.has_message_available():
                    self.caught_up.set()
                    log.info(
                        "subject state caught up with the events topic",
                        extra={"topic": self.topic, "events": self.read},
                    )
                    continue
                envelope = await reader.read_next()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The client reconnects by itself; keep the state we have and try again.
                log.exception("reading the events topic failed", extra={"topic": self.topic})
                await asyncio.sleep(self._retry_delay_s)
                continue
            self._enricher.record_event(self.objective, envelope.message, envelope.publish_time_ms)
            self.read += 1
            if self.read % _YIELD_EVERY == 0:
                await asyncio.sleep(0)

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
