"""Which tasks a model runner takes: pure checks, no I/O and no clock of their own.

A task is skipped (counted, acknowledged, nothing published) when it names its scorers
(`ScoringTask.scorers`) and this deployment is not one of them, when its deadline has passed,
when it names no scorers, the deployment exists for experimentation (challenger, canary) and
the subject denied it (the rendezvous resolved the objective's default consent into the task,
so only DENIED matters here), or when its return address is missing or is not a rendezvous
instance's prediction topic (a producer is made and kept per return address, so a task must
not be able to name any topic it likes).

A task that names its scorers was decided by the rendezvous under the task's
`objective_version` (roles, enabled, sampling, consent): a listed deployment scores it
without a consent check of its own, which could only disagree with that decision when this
runner still holds an older role than the version that decided the task.
"""

from __future__ import annotations

from rendezvous.v1 import common_pb2, task_pb2

from services.core.protos import seconds_until
from services.core.topics import Topics

SKIP_EXPIRED = "expired"
SKIP_CONSENT = "consent_denied"
SKIP_NO_RETURN_ADDRESS = "no_return_address"
SKIP_BAD_RETURN_ADDRESS = "bad_return_address"
SKIP_NOT_A_SCORER = "not_a_scorer"
SKIP_REASONS = (
    SKIP_NOT_A_SCORER,
    SKIP_EXPIRED,
    SKIP_CONSENT,
    SKIP_NO_RETURN_ADDRESS,
    SKIP_BAD_RETURN_ADDRESS,
)


def skip_reason(
    task: task_pb2.ScoringTask,
    now_ns: int,
    *,
    model: str,
    experimental: bool,
    topics: Topics,
) -> str | None:
    """Why deployment `model` skips `task` at `now_ns` (wall clock), or None to score it."""
    scorers = task.scorers
    # First: a task meant for other deployments is none of this one's business (not even
    # its expiry, which would otherwise be counted once per hosted model).
    if scorers and model not in scorers:
        return SKIP_NOT_A_SCORER
    if task.HasField("deadline") and seconds_until(task.deadline, now_ns) <= 0:
        return SKIP_EXPIRED
    if (
        not scorers
        and experimental
        and task.request.consent.experimentation == common_pb2.CONSENT_DECISION_DENIED
    ):
        return SKIP_CONSENT
    if not task.return_address:
        return SKIP_NO_RETURN_ADDRESS
    if not topics.is_return_address(task.return_address):
        return SKIP_BAD_RETURN_ADDRESS
    return None


def call_timeout_s(task: task_pb2.ScoringTask, ceiling_s: float) -> float:
    """How long a model call for `task` may take: the time left to its deadline, capped."""
    if not task.HasField("deadline"):
        return ceiling_s
    return max(0.0, min(ceiling_s, seconds_until(task.deadline)))
