"""Enrichment: one function that turns a ScoringTask into an EnrichedTask.

The Pulsar path (requests topic -> tasks topic) and the gRPC `EnricherService.Enrich`
both call `Enricher.enrich`, so a model sees exactly what a direct call returns.
"""

from __future__ import annotations

import time

from rendezvous.v1 import task_pb2

from services.core.protos import set_values, timestamp_from_ns
from services.core.telemetry import counter
from services.enricher.store import SubjectStore

EVENTS = counter(
    "rdv_enricher_events", "Subject events the enricher read, by outcome", ("objective", "outcome")
)


class Enricher:
    """The subject state of the objectives this enricher follows, and the enrich step."""

    def __init__(self, objectives: list[str], store: SubjectStore) -> None:
        # A set: an enricher that follows the control topic adds and drops objectives live.
        self.objectives = set(objectives)
        self.store = store

    def record_event(
        self, objective: str, event: task_pb2.SubjectEvent, publish_time_ms: int
    ) -> bool:
        """Keep one event read from `objective`'s events topic; False when it was unusable."""
        if not event.subject_id:
            # Nobody to attribute it to; counted so a misbehaving producer shows up.
            EVENTS.labels(objective, "no_subject").inc()
            return False
        time_ns = (
            event.event_time.ToNanoseconds()
            if event.HasField("event_time")
            else publish_time_ms * 1_000_000
        )
        self.store.record(objective, event.subject_id, event.kind, time_ns)
        EVENTS.labels(objective, "kept").inc()
        return True

    def enrich(
        self, task: task_pb2.ScoringTask, now_ns: int | None = None
    ) -> task_pb2.EnrichedTask:
        """The task, unchanged, with its subject's state and the time of enrichment."""
        now = time.time_ns() if now_ns is None else now_ns
        enriched = task_pb2.EnrichedTask()
        enriched.task.CopyFrom(task)
        state = self.store.state(task.request.objective, task.request.subject_id, now)
        set_values(enriched.subject_state, state)
        enriched.enriched_time.CopyFrom(timestamp_from_ns(time.time_ns()))
        return enriched
