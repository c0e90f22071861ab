"""Enrichment: one function that turns a ScoringTask into an EnrichedTask.

The Pulsar path (requests topic -> tasks topic) and the gRPC `EnricherService.Enrich`
both call `Enricher.enrich`, so a model sees exactly what a direct call returns.

Erasure (`Enricher.erase`, fed by the erasure topic): the erased subject's state is dropped,
and from then on every event of that subject published up to the erasure's time is
skipped, also when the state is rebuilt from the events topic after a restart (the erasure
topic is read first). Subjects are matched by pseudonym (`services.core.privacy`): the
erasure topic never carries a subject id. Events published after the erasure are kept: a
subject who comes back is new data.
"""

from __future__ import annotations

import time

from rendezvous.v1 import keyring_pb2, task_pb2

from services.core.privacy import Pseudonyms
from services.core.protos import set_values, timestamp_from_ns
from services.core.telemetry import counter
from services.enricher.store import SubjectStore

EVENTS = counter(
    "rdv_enricher_events", "Subject events the enricher read, by outcome", ("objective", "outcome")
)


class Enricher:
    """The subject state of the objectives this enricher follows, and the enrich step."""

    def __init__(
        self, objectives: list[str], store: SubjectStore, pseudonyms: Pseudonyms | None = None
    ) -> None:
        # A set: an enricher that follows the control topic adds and drops objectives live.
        self.objectives = set(objectives)
        self.store = store
        self.pseudonyms = pseudonyms
        # (objective, or "" for every one; pseudonym) -> the latest erasure's time (ns):
        # events of the subject published up to then are never kept again.
        self.erased: dict[tuple[str, str], int] = {}

    def erase(self, erasure: keyring_pb2.Erasure) -> int:
        """Forget the erased subject and skip its earlier events from now on; how many
        (objective, subject) states were dropped."""
        if self.pseudonyms is None:
            return 0
        pseudonyms = self.pseudonyms
        wanted = (erasure.objective, erasure.pseudonym)
        erased_ns = erasure.erased_time.ToNanoseconds()
        self.erased[wanted] = max(self.erased.get(wanted, 0), erased_ns)
        dropped = self.store.remove_where(
            erasure.objective, lambda subject: pseudonyms.of(subject) == erasure.pseudonym
        )
        EVENTS.labels(erasure.objective or "*", "erased_states").inc(dropped)
        return dropped

    def _erased(self, objective: str, subject_id: str, publish_time_ms: int) -> bool:
        if not self.erased or self.pseudonyms is None:
            return False
        pseudonym = self.pseudonyms.of(subject_id)
        until_ns = max(
            self.erased.get((objective, pseudonym), 0), self.erased.get(("", pseudonym), 0)
        )
        return publish_time_ms * 1_000_000 <= until_ns

    def record_event(
        self, objective: str, event: task_pb2.SubjectEvent, publish_time_ms: int
    ) -> bool:
        """Keep one event read from `objective`'s events topic; False when it was unusable."""
        if not event.subject_id:
            # Nobody to attribute it to; counted so a misbehaving producer shows up.
            EVENTS.labels(objective, "no_subject").inc()
            return False
        if self._erased(objective, event.subject_id, publish_time_ms):
            # Published before the subject was erased: never part of its state again.
            EVENTS.labels(objective, "erased").inc()
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
