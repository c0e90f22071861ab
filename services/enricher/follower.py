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

import logging

from rendezvous.v1 import task_pb2

from services.core.bus import Bus, Envelope
from services.core.topic_follower import TopicFollower
from services.enricher.enrich import Enricher

log = logging.getLogger(__name__)


class EventFollower(TopicFollower[task_pb2.SubjectEvent]):
    """Reads one objective's events topic, from the earliest message, forever."""

    def __init__(self, bus: Bus, objective: str, enricher: Enricher, retry_delay_s: float) -> None:
        super().__init__(
            bus, bus.topics.events(objective), task_pb2.SubjectEvent, retry_delay_s=retry_delay_s
        )
        self.objective = objective
        self._enricher = enricher

    async def take(self, envelope: Envelope[task_pb2.SubjectEvent]) -> None:
        self._enricher.record_event(self.objective, envelope.message, envelope.publish_time_ms)

    def on_caught_up(self) -> None:
        log.info(
            "subject state caught up with the events topic",
            extra={"topic": self.topic, "events": self.read},
        )
