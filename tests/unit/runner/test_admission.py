"""Which tasks a deployment takes: the scorers the rendezvous named, expiry, consent."""

from __future__ import annotations

import time

import pytest
from rendezvous.v1 import common_pb2, scoring_pb2, task_pb2

from services.core.protos import timestamp_from_ns
from services.core.topics import Topics
from services.runner.admission import (
    SKIP_CONSENT,
    SKIP_EXPIRED,
    SKIP_NOT_A_SCORER,
    skip_reason,
)

TOPICS = Topics()
SECOND = 1_000_000_000


def _task(
    *scorers: str,
    denied: bool = False,
    deadline_in_s: float = 5.0,
) -> task_pb2.ScoringTask:
    consent = common_pb2.Consent(
        experimentation=common_pb2.CONSENT_DECISION_DENIED
        if denied
        else common_pb2.CONSENT_DECISION_UNSPECIFIED
    )
    return task_pb2.ScoringTask(
        request=scoring_pb2.ScoreRequest(objective="o", request_id="r", consent=consent),
        return_address=TOPICS.predictions("rdv-0"),
        deadline=timestamp_from_ns(time.time_ns() + int(deadline_in_s * SECOND)),
        scorers=list(scorers),
    )


def _reason(task: task_pb2.ScoringTask, model: str, *, experimental: bool) -> str | None:
    return skip_reason(task, time.time_ns(), model=model, experimental=experimental, topics=TOPICS)


@pytest.mark.parametrize("experimental", [False, True])
def test_a_deployment_the_task_does_not_list_skips_it(experimental: bool) -> None:
    assert _reason(_task("inc", "chal"), "other", experimental=experimental) == SKIP_NOT_A_SCORER


def test_a_listed_deployment_scores_it() -> None:
    assert _reason(_task("inc", "chal"), "chal", experimental=True) is None


def test_a_listed_challenger_does_not_recheck_consent() -> None:
    # The rendezvous decided consent under the task's version; a runner still holding an
    # older role must not overrule it.
    assert _reason(_task("chal", denied=True), "chal", experimental=True) is None


def test_without_scorers_the_runner_applies_consent_itself() -> None:
    assert _reason(_task(denied=True), "chal", experimental=True) == SKIP_CONSENT
    assert _reason(_task(denied=True), "inc", experimental=False) is None
    assert _reason(_task(), "chal", experimental=True) is None


def test_not_listed_wins_over_expired() -> None:
    expired = _task("inc", deadline_in_s=-1.0)
    assert _reason(expired, "other", experimental=False) == SKIP_NOT_A_SCORER
    assert _reason(expired, "inc", experimental=False) == SKIP_EXPIRED
