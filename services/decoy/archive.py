"""What the decoy keeps: an ArchiveRecord made from an EnrichedTask.

The record holds the task exactly as the models saw it, then:
- when the subject denied archiving (the request's `consent.archiving`, or the objective's
  default when the request leaves it unspecified), the request's features and payload and
  the enricher's subject_state are dropped and `features_dropped` is set;
- every field marked `(rendezvous.v1.pii) = true`, anywhere in the record, is cleared
  (`redact_pii`), and `redacted_fields` lists the paths of the cleared fields relative to
  the ArchiveRecord, e.g. `task.task.request.subject_id`. A field that was empty is not
  listed: nothing was hidden.
"""

from __future__ import annotations

from rendezvous.v1 import common_pb2, task_pb2

from services.core.protos import now_timestamp, redact_pii


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
