"""The replay's pure parts: times and windows, what is replayed, pacing, refusals, the figures."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rendezvous.v1 import common_pb2, feedback_pb2, objective_pb2, scoring_pb2, task_pb2

from services.core.bus import Envelope, RawMessage
from services.core.protos import timestamp_from_ns
from services.core.settings import PulsarSettings
from services.evaluator.replay import (
    ANSWERED,
    CallResult,
    Counts,
    ModelSource,
    Pacer,
    ReplayReport,
    ReplaySettings,
    UsageError,
    Window,
    agreement,
    classify,
    format_report,
    ground_truth,
    labelled_requests,
    options_from_args,
    parse_time,
    pulsar_settings,
    refusal,
    replayable,
    send_paced,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
SECOND_NS = 1_000_000_000
INCUMBENT = common_pb2.MODEL_ROLE_INCUMBENT
CHALLENGER = common_pb2.MODEL_ROLE_CHALLENGER


def ns(moment: datetime) -> int:
    return int(moment.timestamp()) * SECOND_NS


# ---------------------------------------------------------------------------- times, window


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("-15m", NOW - timedelta(minutes=15)),
        ("15m", NOW - timedelta(minutes=15)),
        ("-2h", NOW - timedelta(hours=2)),
        ("-30s", NOW - timedelta(seconds=30)),
        ("-1.5d", NOW - timedelta(days=1.5)),
        ("2025-01-31T12:00:00Z", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-01-31T14:00:00+02:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        # Naive means UTC, whatever the machine's zone.
        ("2025-01-31T12:00:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-01-31", datetime(2025, 1, 31, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "15", "-15", "+15m", "-15y", ""])
def test_parse_time_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(UsageError, match="cannot read the time"):
        parse_time(text, NOW)


def test_window_is_half_open() -> None:
    window = Window.parse("-10m", "-5m", NOW)
    since = ns(NOW - timedelta(minutes=10))
    until = ns(NOW - timedelta(minutes=5))
    assert window == Window(since, until)
    assert window.contains(since)
    assert window.contains(until - 1)
    assert not window.contains(until)
    assert not window.contains(since - 1)
    assert Window().contains(0)
    assert window.describe() == {
        "since": "2025-03-01T11:50:00+00:00",
        "until": "2025-03-01T11:55:00+00:00",
    }


def test_window_refuses_an_empty_range() -> None:
    with pytest.raises(UsageError, match="not before"):
        Window.parse("-5m", "-10m", NOW)
    with pytest.raises(UsageError):
        Window.parse("now", "now", NOW)


def record(
    request_id: str,
    received_ns: int,
    *,
    dropped: bool = False,
    warmup: bool = False,
) -> task_pb2.ArchiveRecord:
    task = task_pb2.ScoringTask(
        request=scoring_pb2.ScoreRequest(request_id=request_id, objective="demo"),
        received_time=timestamp_from_ns(received_ns),
        warmup=warmup,
    )
    return task_pb2.ArchiveRecord(task=task_pb2.EnrichedTask(task=task), features_dropped=dropped)


def test_classify() -> None:
    window = Window(100 * SECOND_NS, 200 * SECOND_NS)
    assert classify(record("a", 150 * SECOND_NS), window) == "replay"
    assert classify(record("a", 50 * SECOND_NS), window) == "outside_window"
    assert classify(record("a", 150 * SECOND_NS, dropped=True), window) == "features_dropped"
    # Outside the window is said first: a dropped task there is not "skipped".
    assert classify(record("a", 250 * SECOND_NS, dropped=True), window) == "outside_window"
    assert classify(record("a", 150 * SECOND_NS, warmup=True), window) == "warmup"


async def _envelopes(
    records: Iterable[task_pb2.ArchiveRecord],
) -> AsyncIterator[Envelope[task_pb2.ArchiveRecord]]:
    for item in records:
        raw = RawMessage(item.SerializeToString(), {}, None, "archive", 0, 0)
        yield Envelope.of(item, raw)


async def test_replayable_counts_what_it_leaves_out() -> None:
    counts = Counts()
    records = [
        record("a", 150),
        record("a", 150),  # redelivered: replayed once
        record("b", 150, dropped=True),
        record("c", 50),
        record("d", 150, warmup=True),
        record("e", 199),
    ]
    tasks = [t async for t in replayable(_envelopes(records), Window(100, 200), counts)]
    assert [t.task.request.request_id for t in tasks] == ["a", "e"]
    assert counts.archived == 6
    assert counts.duplicates == 1
    assert counts.skipped_features_dropped == 1
    assert counts.outside_window == 1
    assert counts.warmup == 1


# ---------------------------------------------------------------------------- pacing


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pacer_spaces_calls_and_never_catches_up() -> None:
    clock = FakeClock()
    pacer = Pacer(10.0, clock)
    waits = [pacer.reserve() for _ in range(3)]
    assert waits == pytest.approx([0.0, 0.1, 0.2])
    # A stall: the next slot is now, not a burst of the slots missed meanwhile.
    clock.now = 5.0
    assert pacer.reserve() == pytest.approx(0.0)
    assert pacer.reserve() == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Pacer(0.0)


async def test_send_paced_bounds_calls_in_flight_and_keeps_going_after_errors() -> None:
    in_flight = 0
    most = 0

    async def call(task: task_pb2.EnrichedTask) -> CallResult:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        request_id = task.task.request.request_id
        if request_id.endswith("3"):
            return CallResult(request_id, None, "UNAVAILABLE", 0.01)
        return CallResult(request_id, 1.0, None, 0.01)

    async def tasks() -> AsyncIterator[task_pb2.EnrichedTask]:
        for index in range(20):
            yield record(f"r{index}", 0).task

    results: list[CallResult] = []
    await send_paced(tasks(), call, Pacer(10_000.0), 3, results.append)
    assert len(results) == 20
    assert most == 3
    assert sum(1 for r in results if r.error == "UNAVAILABLE") == 2


# ---------------------------------------------------------------------------- refusals


def config() -> objective_pb2.ObjectiveConfig:
    live = objective_pb2.ObjectiveConfig(objective="demo", version=7)
    live.models.add(name="ridge", role=INCUMBENT, kind="diabetes")
    live.models.add(name="remote", role=CHALLENGER, endpoint="10.0.0.5:7000")
    return live


def test_refusal() -> None:
    assert refusal(config(), "shadow", None, []) is None
    assert refusal(config(), "shadow", "127.0.0.1:9999", ["127.0.0.1:5000"]) is None
    named = refusal(config(), "ridge", None, [])
    assert named is not None and "'ridge' is a deployment of 'demo' (version 7)" in named
    assert refusal(config(), "shadow", "10.0.0.5:7000", []) is not None
    # The mesh's own processes, however the loopback is spelt.
    assert refusal(config(), "shadow", "localhost:5000", ["127.0.0.1:5000"]) is not None


# ---------------------------------------------------------------------------- the figures


def outcome(
    request_id: str, scores: dict[str, tuple[int, float]], answer: float
) -> task_pb2.Outcome:
    record = task_pb2.Outcome(
        request_id=request_id, objective="demo", received_time=timestamp_from_ns(SECOND_NS)
    )
    for model, (role, score) in scores.items():
        event = task_pb2.PredictionEvent(request_id=request_id, model=model, role=role)  # type: ignore[arg-type]
        event.prediction.score = score
        record.candidates.add(prediction=event, status=task_pb2.CANDIDATE_STATUS_IN_TIME)
    record.response.score = answer
    return record


def feedback(request_id: str, value: float) -> feedback_pb2.Feedback:
    return feedback_pb2.Feedback(objective="demo", request_id=request_id, value=value)


def scenario(
    count: int = 60,
) -> tuple[dict[str, float], list[task_pb2.Outcome], list[feedback_pb2.Feedback]]:
    """Truth i; the incumbent is off by 1, the challenger by 5, the replay by `replay_off`."""
    truths = {f"r{i}": float(i) for i in range(count)}
    outcomes = [
        outcome(rid, {"inc": (INCUMBENT, t + 1.0), "chal": (CHALLENGER, t + 5.0)}, t + 1.0)
        for rid, t in truths.items()
    ]
    labels = [feedback(rid, t) for rid, t in truths.items()]
    return truths, outcomes, labels


def test_agreement_pairs_each_live_model_and_the_answer() -> None:
    truths, outcomes, _ = scenario()
    replayed = {rid: t + 1.0 for rid, t in truths.items() if rid != "r0"}
    rows = {row.model: row for row in agreement(replayed, outcomes)}
    assert list(rows)[-1] == ANSWERED
    assert rows["inc"].pairs == len(replayed)
    assert rows["inc"].mean_absolute_difference == 0.0
    assert rows["inc"].spearman == pytest.approx(1.0)
    assert rows["inc"].role == "incumbent"
    assert rows["chal"].mean_absolute_difference == pytest.approx(4.0)
    assert rows[ANSWERED].pairs == len(replayed)


def test_the_latest_feedback_wins_and_only_replayed_requests_count() -> None:
    truths, outcomes, labels = scenario()
    corrected = [feedback("r1", 1000.0), *labels]  # the wrong one came first
    replayed = {rid: t + 1.0 for rid, t in truths.items() if rid != "r0"}
    joined, shadowed = labelled_requests("shadow", replayed, outcomes, corrected)
    assert shadowed == 0
    assert len(joined) == len(replayed)
    by_id = {request.request_id: request for request in joined}
    assert by_id["r1"].truth == 1.0
    assert by_id["r1"].scores["shadow"] == 2.0


def test_ground_truth_verdicts() -> None:
    truths, outcomes, labels = scenario()
    settings = ReplaySettings(resamples=500)
    twin = {rid: t + 1.0 for rid, t in truths.items()}
    joined, _ = labelled_requests("twin", twin, outcomes, labels)
    (truth,) = ground_truth("twin", joined, settings)
    assert truth.kind == "regression"
    assert [row.model for row in truth.errors] == ["twin", "chal", "inc", ANSWERED]
    errors = {row.model: row.figures for row in truth.errors}
    assert errors["twin"] == errors["inc"]
    assert truth.replay is not None and truth.replay.verdict == "inconclusive"
    assert truth.comparisons["chal"].verdict == "worse"

    better = {rid: t for rid, t in truths.items()}
    joined, _ = labelled_requests("exact", better, outcomes, labels)
    (truth,) = ground_truth("exact", joined, settings)
    assert truth.replay is not None and truth.replay.verdict == "better"
    assert truth.replay.interval.high < 0


def test_a_past_deployment_of_the_same_name_gives_way() -> None:
    truths, outcomes, labels = scenario(5)
    joined, shadowed = labelled_requests("chal", dict.fromkeys(truths, 0.0), outcomes, labels)
    assert shadowed == 5
    assert all(request.scores["chal"] == 0.0 for request in joined)


def test_report_json_and_table() -> None:
    truths, outcomes, labels = scenario()
    report = ReplayReport(
        objective="demo",
        objective_version=3,
        model="twin",
        source=ModelSource("twin", kind="diabetes").describe(),
        window=Window(),
        rate=50.0,
        max_in_flight=8,
        call_timeout_s=2.0,
    )
    scores = {rid: t + 1.0 for rid, t in truths.items()}
    report.counts.replayed = report.counts.succeeded = len(scores)
    report.counts.errors["UNAVAILABLE"] = 0
    report.latency.add(0.001)
    report.agreement = agreement(scores, outcomes)
    joined, _ = labelled_requests("twin", scores, outcomes, labels)
    report.ground_truth = ground_truth("twin", joined, ReplaySettings(resamples=200))
    data = report.to_dict()
    # Strict JSON: NaN is null.
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["achieved_rate"] is None
    assert data["ground_truth"][0]["replay_vs_incumbent"]["verdict"] == "inconclusive"
    table = format_report(report)
    assert "paired comparison with the incumbent" in table
    assert "twin" in table and "inconclusive" in table
    assert not math.isnan(data["latency_s"]["p50"])


# ---------------------------------------------------------------------------- the command line


def args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "objective": "demo",
        "model": "shadow",
        "kind": "diabetes",
        "endpoint": None,
        "args": None,
        "model_version": "1",
        "since": None,
        "until": None,
        "rate": None,
        "in_flight": None,
        "timeout": None,
        "state_dir": "/nonexistent",
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def test_options_from_args_defaults_and_errors() -> None:
    settings = ReplaySettings()
    options = options_from_args(args(args='{"algorithm": "linear"}'), settings, NOW)
    assert options.rate == settings.rate
    assert options.max_in_flight == settings.max_in_flight
    assert options.source.args == {"algorithm": "linear"}
    with pytest.raises(UsageError, match="not JSON"):
        options_from_args(args(args="{"), settings, NOW)
    with pytest.raises(UsageError, match="JSON object"):
        options_from_args(args(args="[1]"), settings, NOW)
    with pytest.raises(UsageError, match="do not fit kind diabetes"):
        options_from_args(args(args='{"algorithm": "forest"}'), settings, NOW)
    with pytest.raises(UsageError, match="not an --endpoint"):
        options_from_args(args(kind=None, endpoint="h:1", args="{}"), settings, NOW)
    with pytest.raises(UsageError, match="positive"):
        options_from_args(args(rate=0.0), settings, NOW)


def test_pulsar_url_precedence(tmp_path: Path) -> None:
    state = {"pulsar_url": "pulsar://127.0.0.1:6699", "pulsar_admin_url": "http://x:1"}
    settings = ReplaySettings()
    assert pulsar_settings(settings, None, state).service_url == "pulsar://127.0.0.1:6699"
    assert pulsar_settings(settings, "pulsar://given:1", state).service_url == "pulsar://given:1"
    configured = ReplaySettings(pulsar=PulsarSettings(service_url="pulsar://env:1"))
    assert pulsar_settings(configured, None, state).service_url == "pulsar://env:1"
    assert pulsar_settings(settings, None, {}).service_url == PulsarSettings().service_url
