"""What the decoy keeps: an ArchiveRecord made from an EnrichedTask.

The record holds the task exactly as the models saw it, then:
- when the subject denied archiving (the request's `consent.archiving`, or the objective's
  default when the request leaves it unspecified), the request's features and payload and
  the enricher's subject_state are dropped and `features_dropped` is set;
- every field marked `(rendezvous.v1.pii) = true`, anywhere in the record, is cleared
  (`redact_pii`), and `redacted_fields` lists the paths of the cleared fields relative to
  the ArchiveRecord, e.g. `task.task.request.subject_id`. A field that was empty is not
  listed: nothing was hidden.

A task whose request names a subject is then sealed under the subject's key when the mesh
runs a keyring (`services.core.privacy.Sealer`): the features, payload and subject state are
readable only inside the record's `sealed` part, and erasing the subject deletes the key.

`Archiver` puts a burst of tasks on the objective's archive topic: the decoy process uses it,
and so does a runner host that hosts the decoy (one receive of a task then serves the
objective's models and its archive). Warm-up tasks are never archived, nor is a task the
rendezvous marked `skip_archive` (its request fell outside the objective's
`Sampling.archive_fraction`): both are reported done, so they are acknowledged.

The archive publisher is a held one (`Bus.publisher`'s `hold`, as many as the tasks in
flight): a record the broker has not confirmed waits in the client across an outage and
goes out when the broker is back, so a task is never reported failed for a record the broker
then stores anyway (which its redelivery would archive a second time). A task that comes
again (its acknowledgement lost with a killed broker, or the enricher published it twice)
is not archived twice by this process: the `Once` memory of the mailbox ids it archived
(`remember` of them) acknowledges it as done (`rdv_decoy_redeliveries_skipped`).
"""

from __future__ import annotations

import asyncio
import logging

from opentelemetry import context as otel_context
from rendezvous.v1 import common_pb2, task_pb2

from services.core.bus import BusError, Envelope, Publisher
from services.core.once import Once
from services.core.privacy import Sealer
from services.core.protos import now_timestamp, redact_pii
from services.core.telemetry import counter, tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

ARCHIVED = counter(
    "rdv_decoy_archived",
    "Tasks the decoy put on the archive topic",
    ("objective", "features_dropped"),
)
NOT_ARCHIVED = counter(
    "rdv_decoy_not_archived",
    "Tasks the decoy acknowledged without archiving them, by reason",
    ("objective", "reason"),
)
# The request fell outside the objective's archive_fraction (ScoringTask.skip_archive).
SAMPLED_OUT = "sampled_out"
REDELIVERIES_SKIPPED = counter(
    "rdv_decoy_redeliveries_skipped",
    "Tasks acknowledged without a second archive record: this process archived them already",
    ("objective",),
)
ARCHIVE_FAILURES = counter(
    "rdv_decoy_archive_failures",
    "Tasks whose archive publish failed (negatively acknowledged for redelivery)",
    ("objective",),
)


def archiving_denied(task: task_pb2.EnrichedTask, default_denied: bool) -> bool:
    """Whether the subject's consent forbids keeping the task's features."""
    decision = task.task.request.consent.archiving
    if decision == common_pb2.CONSENT_DECISION_UNSPECIFIED:
        return default_denied
    return decision == common_pb2.CONSENT_DECISION_DENIED


def archive_record(task: task_pb2.EnrichedTask, *, default_denied: bool) -> task_pb2.ArchiveRecord:
    """The redacted record of one task; `task` itself is left unchanged."""
    record = task_pb2.ArchiveRecord()
    record.task.CopyFrom(task)
    if archiving_denied(task, default_denied):
        request = record.task.task.request
        request.ClearField("features")
        request.ClearField("payload")
        record.task.ClearField("subject_state")
        record.features_dropped = True
    record.redacted_fields.extend(redact_pii(record))
    record.archived_time.CopyFrom(now_timestamp())
    return record


class Archiver:
    """Archives tasks of one objective; reports per task whether its record is on the topic."""

    def __init__(
        self,
        publisher: Publisher[task_pb2.ArchiveRecord],
        objective: str,
        *,
        default_denied: bool,
        remember: int,
        sealer: Sealer | None = None,
    ) -> None:
        """`publisher` should be a held one (see the module); `remember`: how many of the
        tasks archived are remembered, so that one coming again is not archived twice."""
        self.publisher = publisher
        self.sealer = sealer
        self.objective = objective
        # Public: a live runner host updates it when the objective's default consent changes.
        self.default_denied = default_denied
        self.once = Once(remember, REDELIVERIES_SKIPPED.labels(objective).inc)
        self._archived = {
            dropped: ARCHIVED.labels(objective, str(dropped).lower()) for dropped in (False, True)
        }
        self._failures = ARCHIVE_FAILURES.labels(objective)
        self._sampled_out = NOT_ARCHIVED.labels(objective, SAMPLED_OUT)
        self.archived = 0
        self.sampled_out = 0

    async def archive(self, envelopes: list[Envelope[task_pb2.EnrichedTask]]) -> list[bool]:
        """True per task once its record is on the archive topic (or it is not to be archived:
        a warm-up task, a task marked skip_archive), False when the publish failed and the task
        should be redelivered."""
        # Inside the first task's CONSUMER span; each record is published in its own task's
        # trace (the first one's under this span).
        with _tracer.start_as_current_span(
            "decoy.archive",
            context=envelopes[0].trace_context(),
            attributes={"rdv.objective": self.objective, "rdv.batch_size": len(envelopes)},
        ):
            # Published in one turn of the loop: the records leave as one batch.
            return list(
                await asyncio.gather(
                    *(
                        self._one(e.message, None if i == 0 else e.trace_context())
                        for i, e in enumerate(envelopes)
                    )
                )
            )

    async def _one(
        self, task: task_pb2.EnrichedTask, context: otel_context.Context | None = None
    ) -> bool:
        if task.task.warmup:
            return True
        if task.task.skip_archive:
            self.sampled_out += 1
            self._sampled_out.inc()
            return True
        # The mailbox id names one accepted request (a client may send a request id twice);
        # a task that comes again carries the same one.
        return await self.once.run(task.task.mailbox_id, lambda: self._publish(task, context))

    async def _publish(
        self, task: task_pb2.EnrichedTask, context: otel_context.Context | None
    ) -> bool:
        record = archive_record(task, default_denied=self.default_denied)
        request = task.task.request
        if self.sealer is not None:
            record = await self.sealer.seal(record, request.subject_id, request.objective)
        request_id = request.request_id
        try:
            # No timeout of our own: the held publisher keeps the record until the broker has
            # it, and fails only what it will not send.
            await self.publisher.publish(record, key=request_id or None, context=context)
        except BusError as exc:
            self._failures.inc()
            log.warning(
                "archiving a task failed; redelivery requested",
                extra={"topic": self.publisher.topic, "error": type(exc).__name__},
            )
            return False
        self.archived += 1
        self._archived[record.features_dropped].inc()
        return True
