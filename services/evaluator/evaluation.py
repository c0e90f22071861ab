"""The evaluator's state: one `ObjectiveStore` per objective, fed by followers of its results
and feedback topics, and the two things asked of it: a report, and recording feedback.

Every objective the control topic holds (or the ones `serve_only` names) gets two
`TopicFollower`s reading from the earliest retained message: the results topic (every
outcome, every candidate) and the feedback topic (the ground truth). Nothing is kept but
what the topics hold, so a restarted evaluator rebuilds the same figures; an objective added
later is followed from the moment its first version arrives.

Outcomes sealed under a subject's key (`services.core.privacy`) are opened as they are
read, the keyring asked once per key not cached (a keyring that does not answer holds the
read back, it is tried again: nothing is miscounted as erased). One whose key is gone (the
subject was erased) counts in the requests and latency of its bucket, never in a score
figure (`erased_requests`). The erasure topic is followed too: a running evaluator drops
the records it had opened with an erased key at once.

The canary drift alarm is checked every `drift_check_s` for each objective whose current
configuration has a canary: the PSI of its recent scores against the reference window goes
to `rdv_evaluator_canary_psi`, the alarm to `rdv_evaluator_canary_drift_alarm` (1 while
raised), and a raise or a clear is logged once, when it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import timestamp_pb2
from rendezvous.v1 import common_pb2, evaluation_pb2, feedback_pb2, keyring_pb2, task_pb2

from services.core.bus import Bus, Envelope, Publisher
from services.core.control_topic import ControlFollower, ObjectiveConfig, follow
from services.core.errors import InvalidArgument, NotFound, Unavailable
from services.core.lifecycle import cancel_and_wait
from services.core.privacy import ErasureFollower, KeyringUnavailable, Opener, Openness
from services.core.protos import now_timestamp
from services.core.telemetry import counter, gauge
from services.core.topic_follower import TopicFollower
from services.evaluator import report as reports
from services.evaluator import stats
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.store import ObjectiveStore

log = logging.getLogger(__name__)

OUTCOMES = counter(
    "rdv_evaluator_outcomes", "Outcomes the evaluator took from the results topic", ("objective",)
)
FEEDBACK = counter(
    "rdv_evaluator_feedback",
    "Observations the evaluator took from the feedback topic",
    ("objective",),
)
ERASED = counter(
    "rdv_evaluator_erased_outcomes",
    "Outcomes read without their subject data (the subject was erased, or it was withheld)",
    ("objective",),
)
RECORDED = counter(
    "rdv_evaluator_feedback_recorded",
    "Observations FeedbackService.Record published",
    ("objective",),
)
PENDING_FEEDBACK = gauge(
    "rdv_evaluator_pending_feedback",
    "Observations whose outcome the evaluator does not hold",
    ("objective",),
)
CANARY_PSI = gauge(
    "rdv_evaluator_canary_psi",
    "PSI of the canary's recent scores against its reference window (NaN: too few scores)",
    ("objective", "model"),
)
CANARY_ALARM = gauge(
    "rdv_evaluator_canary_drift_alarm",
    "1 while the canary's drift is above the threshold",
    ("objective", "model"),
)

# A request id longer than this is no id the rendezvous gave (it assigns UUIDs; clients'
# own ids are bounded by ScoreRequest validation).
MAX_REQUEST_ID = 256

Watch = Callable[[asyncio.Task[Any]], asyncio.Task[Any]]


class _OutcomeFollower(TopicFollower[task_pb2.Outcome]):
    def __init__(
        self, bus: Bus, store: ObjectiveStore, opener: Opener, retry_delay_s: float
    ) -> None:
        super().__init__(
            bus, bus.topics.results(store.objective), task_pb2.Outcome, retry_delay_s=retry_delay_s
        )
        self.store = store
        self._opener = opener
        self._counted = OUTCOMES.labels(store.objective)
        self._erased = ERASED.labels(store.objective)

    async def take(self, envelope: Envelope[task_pb2.Outcome]) -> None:
        while True:
            try:
                opened = await self._opener.open(envelope.message)
                break
            except KeyringUnavailable as error:
                log.warning(
                    "the keyring does not answer; reading outcomes waits",
                    extra={"objective": self.store.objective, "error": str(error)},
                )
                await asyncio.sleep(self._retry_delay_s)
        if opened.state in (Openness.CLEAR, Openness.OPENED):
            added = self.store.add_outcome(opened.record, opened.key_id)
        else:
            added = self.store.add_erased_outcome(opened.record)
            if added:
                self._erased.inc()
        if added:
            self._counted.inc()


class _FeedbackFollower(TopicFollower[feedback_pb2.Feedback]):
    def __init__(self, bus: Bus, store: ObjectiveStore, retry_delay_s: float) -> None:
        super().__init__(
            bus,
            bus.topics.feedback(store.objective),
            feedback_pb2.Feedback,
            retry_delay_s=retry_delay_s,
        )
        self.store = store
        self._counted = FEEDBACK.labels(store.objective)

    async def take(self, envelope: Envelope[feedback_pb2.Feedback]) -> None:
        self.store.add_feedback(envelope.message)
        self._counted.inc()


@dataclass
class _Followed:
    store: ObjectiveStore
    outcomes: _OutcomeFollower
    feedback: _FeedbackFollower
    publisher: Publisher[feedback_pb2.Feedback]

    @property
    def caught_up(self) -> bool:
        return self.outcomes.caught_up.is_set() and self.feedback.caught_up.is_set()


class Evaluation:
    """Stores, followers and publishers of every objective evaluated."""

    def __init__(self, settings: EvaluatorSettings) -> None:
        self.settings = settings
        self.report_settings = settings.report
        self.objectives: dict[str, _Followed] = {}
        self._control: ControlFollower | None = None
        self._bus: Bus | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._watch: Watch | None = None
        self._alarms: dict[str, bool] = {}
        self._adding = asyncio.Lock()
        self.opener = Opener(settings.privacy, settings.tls)

    # --------------------------------------------------------------------------- lifecycle

    async def open(self, bus: Bus, stack: contextlib.AsyncExitStack, watch: Watch) -> None:
        """Follows the control topic and every objective's topics; returns once caught up
        with their retained history (or after catch_up_timeout_s, logged)."""
        self._bus, self._stack, self._watch = bus, stack, watch
        stack.push_async_callback(self.opener.close)
        if self.opener.client is not None:
            erasures = ErasureFollower(bus, self._erase, self.settings.retry_delay_s)
            await erasures.open()
            stack.push_async_callback(erasures.close)
            reading = watch(asyncio.create_task(erasures.run(), name="evaluator:erasures"))
            stack.push_async_callback(cancel_and_wait, [reading])
        only = self.settings.serve_only or None
        control = self._control = await follow(
            bus, stack, watch, retry_delay_s=self.settings.retry_delay_s, objectives=only
        )
        for name in sorted(control.configs):
            await self._add(name)
        control.listen(self._on_config)
        try:
            await asyncio.wait_for(self._caught_up(), self.settings.catch_up_timeout_s)
        except TimeoutError:
            behind = [n for n, f in self.objectives.items() if not f.caught_up]
            log.warning(
                "serving before the retained history is read; reports grow as it is",
                extra={"objectives": ",".join(behind)},
            )
        watch(asyncio.create_task(self._drift_loop(), name="evaluator:drift"))

    async def _caught_up(self) -> None:
        for followed in list(self.objectives.values()):
            await followed.outcomes.caught_up.wait()
            await followed.feedback.caught_up.wait()

    async def _on_config(self, held: ObjectiveConfig | None, config: ObjectiveConfig) -> None:
        if config.objective not in self.objectives:
            await self._add(config.objective)

    async def _add(self, objective: str) -> None:
        async with self._adding:
            if objective in self.objectives:
                return
            bus, stack, watch = self._bus, self._stack, self._watch
            assert bus is not None and stack is not None and watch is not None
            store = ObjectiveStore(objective, self.settings.limits)
            retry = self.settings.retry_delay_s
            outcomes = _OutcomeFollower(bus, store, self.opener, retry)
            feedback = _FeedbackFollower(bus, store, retry)
            publisher = await bus.publisher(bus.topics.feedback(objective), feedback_pb2.Feedback)
            stack.push_async_callback(publisher.close)
            for follower in (outcomes, feedback):
                await follower.open()
                stack.push_async_callback(follower.close)
                watch(asyncio.create_task(follower.run(), name=f"evaluator:{follower.topic}"))
            self.objectives[objective] = _Followed(store, outcomes, feedback, publisher)
            log.info("evaluating objective", extra={"objective": objective})

    def _erase(self, erasure: keyring_pb2.Erasure, _publish_time_ms: int) -> None:
        """An erasure: its keys are gone, and so is what was opened with them."""
        key_ids = set(erasure.key_ids)
        self.opener.forget(key_ids)
        if not key_ids:
            return
        for followed in self.objectives.values():
            forgotten = followed.store.forget(key_ids)
            if forgotten:
                log.info(
                    "erased records dropped",
                    extra={
                        "objective": followed.store.objective,
                        "pseudonym": erasure.pseudonym,
                        "records": forgotten,
                    },
                )

    def facts(self) -> dict[str, Any]:
        return {
            "objectives": sorted(self.objectives),
            "outcomes": {n: f.store.counters.outcomes for n, f in self.objectives.items()},
        }

    def names(self) -> list[str]:
        return sorted(self.objectives)

    def _followed(self, objective: str) -> _Followed:
        if not objective:
            raise InvalidArgument([("objective", "the objective is required")])
        followed = self.objectives.get(objective)
        if followed is None:
            raise NotFound(
                f"objective {objective!r} is not evaluated here", reason="UNKNOWN_OBJECTIVE"
            )
        return followed

    # ------------------------------------------------------------------------------ report

    async def report(
        self, request: evaluation_pb2.GetEvaluationReportRequest
    ) -> evaluation_pb2.GetEvaluationReportResponse:
        """The report of the request's window (the heavy part in a worker thread)."""
        followed = self._followed(request.objective)
        violations: list[tuple[str, str]] = []
        start_s = _seconds(request.start_time) if request.HasField("start_time") else None
        end_s = _seconds(request.end_time) if request.HasField("end_time") else None
        if start_s is not None and end_s is not None and end_s <= start_s:
            violations.append(("end_time", "must be after start_time"))
        width_s = request.bucket_width.ToNanoseconds() / 1e9
        if width_s < 0:
            violations.append(("bucket_width", "must not be negative"))
        if violations:
            raise InvalidArgument(violations)
        start, end = reports.window_bounds(followed.store, start_s, end_s, time.time())
        snap = reports.snapshot(followed.store, start, end, self.report_settings)
        return await asyncio.to_thread(
            reports.build,
            snap,
            self.report_settings,
            include_charts=request.include_charts,
            bucket_width_s=width_s,
        )

    # ---------------------------------------------------------------------------- feedback

    async def record(self, request: feedback_pb2.RecordRequest) -> feedback_pb2.RecordResponse:
        """Publish one observation on the objective's feedback topic."""
        followed = self._followed(request.objective)
        violations: list[tuple[str, str]] = []
        if not request.request_id:
            violations.append(("request_id", "the scored request's id is required"))
        elif len(request.request_id) > MAX_REQUEST_ID:
            violations.append(("request_id", f"at most {MAX_REQUEST_ID} characters"))
        which = request.WhichOneof("observed")
        if which is None:
            violations.append(("observed", "set value (regression) or label (classification)"))
        elif which == "value" and not math.isfinite(request.value):
            violations.append(("value", "must be a finite number"))
        if violations:
            raise InvalidArgument(violations)
        recorded = now_timestamp()
        feedback = feedback_pb2.Feedback(
            objective=request.objective, request_id=request.request_id, recorded_time=recorded
        )
        if which == "value":
            feedback.value = request.value
        else:
            feedback.label = request.label
        feedback.observed_time.CopyFrom(
            request.observed_time if request.HasField("observed_time") else recorded
        )
        try:
            await followed.publisher.publish(
                feedback, key=request.request_id, timeout=self.settings.publish_timeout_s
            )
        except Exception as error:
            log.warning(
                "publishing feedback failed",
                extra={"objective": request.objective, "error": repr(error)},
            )
            raise Unavailable("the feedback topic is unavailable; try again") from None
        RECORDED.labels(request.objective).inc()
        return feedback_pb2.RecordResponse(request_id=request.request_id, recorded_time=recorded)

    # ------------------------------------------------------------------------------- drift

    async def _drift_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.drift_check_s)
            self.check_drift(time.time())

    def check_drift(self, now_s: float) -> dict[str, reports.DriftFigure]:
        """The canary drift of every objective with a canary, into metrics and the log."""
        figures: dict[str, reports.DriftFigure] = {}
        drift = self.report_settings.drift
        for name, followed in self.objectives.items():
            PENDING_FEEDBACK.labels(name).set(followed.store.pending_feedback)
            canary = self._canary(name)
            if canary is None:
                continue
            records = followed.store.records(now_s - drift.span_s, now_s)
            figure = figures[name] = reports.drift_at(canary, records, now_s, drift)
            CANARY_PSI.labels(name, canary).set(figure.statistic)
            CANARY_ALARM.labels(name, canary).set(1 if figure.alarm else 0)
            if figure.alarm != self._alarms.get(name, False):
                self._alarms[name] = figure.alarm
                fields = {
                    "objective": name,
                    "canary": canary,
                    "psi": round(figure.statistic, 4),
                    "level": stats.drift_level(figure.statistic),
                    "threshold": drift.threshold,
                    "recent_scores": figure.recent_count,
                    "reference_scores": figure.reference_count,
                }
                if figure.alarm:
                    log.warning("canary drift alarm raised: the inputs have shifted", extra=fields)
                else:
                    log.info("canary drift alarm cleared", extra=fields)
        return figures

    def _canary(self, objective: str) -> str | None:
        control = self._control
        config = None if control is None else control.configs.get(objective)
        if config is None:
            return None
        for model in config.models:
            if model.role == common_pb2.MODEL_ROLE_CANARY and model.enabled:
                return str(model.name)
        return None


def _seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9
