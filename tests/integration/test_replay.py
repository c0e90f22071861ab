"""`rendezvous replay` on the real broker, beside a live supervised mesh.

A small demo-like objective (a diabetes incumbent, a `sum` challenger, a linear canary, the
decoy archiving every request) gets ~200 requests in two batches a moment apart, a few of
them from subjects who deny archiving; the true diabetes targets go to the feedback topic
(some first with a wrong value, then corrected: the latest wins). Then the archive is
replayed to models outside the mesh: a twin of the incumbent agrees with it exactly and is
inconclusive against it; the `sum` model is worse with a CI above zero; --since/--until
select exactly the archived tasks of their window; the rate bound holds; and the live topics
see nothing from any of it (no message published, no durable subscription added).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from rendezvous.v1 import common_pb2, feedback_pb2, scoring_pb2, scoring_pb2_grpc, task_pb2

from services.core.bus import connect
from services.core.protos import now_timestamp, set_values
from services.core.settings import PrivacySettings
from services.evaluator.replay import (
    EXIT_USAGE,
    ModelSource,
    ReplayOptions,
    ReplayReport,
    ReplaySettings,
    Window,
    run_replay,
)
from services.supervisor.plan import free_port
from tests.conftest import REPO, PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh
from tests.integration.test_lifecycle import mesh_document as lifecycle_mesh

pytestmark = pytest.mark.integration

FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
BATCH = 100
SEND_RATE = 50.0
# Every DENY_EVERY-th request's subject denies archiving: archived without features.
DENY_EVERY = 20
# Every WRONG_EVERY-th request gets a wrong feedback first, then the true one.
WRONG_EVERY = 10
WRONG_OFFSET = 1000.0
REPLAY_RATE = 100.0
# Wall-clock gap around the window's boundary, so no request is near it.
GAP_S = 1.0
WAIT_S = 90.0
INCUMBENT = "ridge-a"
# The rate bound: n calls spaced 1/rate apart take at least (n - 1) / rate.
RATE_TOLERANCE = 0.98


def mesh_document(objective: str, listen: str) -> dict[str, Any]:
    """The lifecycle test's objective (a ridge incumbent, a linear canary, the decoy), with
    a `sum` challenger scoring every request and every request archived."""
    document = lifecycle_mesh(objective, listen)
    section = document["objectives"][objective]
    section["models"].insert(1, {"name": "feature-sum", "role": "challenger", "kind": "sum"})
    section["sampling"] = {"challenger_fraction": 1.0, "archive_fraction": 1.0}
    return document


@dataclass
class Recorded:
    """What the traffic left on the topics, as the test itself read it."""

    objective: str
    mesh: RunningMesh
    mid: datetime
    targets: dict[str, float]
    denied: set[str]
    # request id -> received time (ns) of every archived record, and whether replayable
    archived: dict[str, tuple[int, bool]]
    incumbent_scores: dict[str, float]
    topics_before: dict[str, Any]


def _rows() -> tuple[list[dict[str, float]], list[float]]:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    names = list(data.feature_names)
    rows = [dict(zip(names, map(float, row), strict=True)) for row in data.data]
    return rows, [float(value) for value in data.target]


async def _send(target: str, objective: str, ids: list[tuple[str, int]], denied: set[str]) -> None:
    rows, _ = _rows()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        started = time.monotonic()
        calls = []
        for index, (request_id, row) in enumerate(ids):
            request = scoring_pb2.ScoreRequest(
                objective=objective, request_id=request_id, subject_id=f"user-{index % 7}"
            )
            if request_id in denied:
                request.consent.archiving = common_pb2.CONSENT_DECISION_DENIED
            set_values(request.features, rows[row])
            await asyncio.sleep(max(0.0, started + index / SEND_RATE - time.monotonic()))
            calls.append(stub.Score(request, timeout=5.0))
        responses = await asyncio.gather(*calls)
    assert all(response.request_id for response in responses)


async def _publish_feedback(
    pulsar: PulsarBroker, objective: str, targets: dict[str, float]
) -> None:
    bus = connect(pulsar.settings(), f"itest-feedback-{uuid.uuid4().hex[:6]}")
    try:
        publisher = await bus.publisher(bus.topics.feedback(objective), feedback_pb2.Feedback)
        for index, (request_id, value) in enumerate(sorted(targets.items())):
            values = [value + WRONG_OFFSET, value] if index % WRONG_EVERY == 0 else [value]
            for observed in values:
                await publisher.publish(
                    feedback_pb2.Feedback(
                        objective=objective,
                        request_id=request_id,
                        value=observed,
                        observed_time=now_timestamp(),
                        recorded_time=now_timestamp(),
                    ),
                    key=request_id,
                )
    finally:
        await bus.close()


async def _read_ours(
    pulsar: PulsarBroker, topic: str, message_type: Any, ids: set[str], request_id: Any
) -> list[Any]:
    """Every message of `topic` about `ids`, waiting until each id has one."""
    bus = connect(pulsar.settings(), f"itest-read-{uuid.uuid4().hex[:6]}")
    found: dict[str, Any] = {}
    try:
        reader = await bus.reader(topic, message_type)
        deadline = time.monotonic() + WAIT_S
        while set(found) != ids and time.monotonic() < deadline:
            envelope = await asyncio.wait_for(reader.read_next(), deadline - time.monotonic())
            key = request_id(envelope.message)
            if key in ids:
                found.setdefault(key, envelope.message)
        await reader.close()
    finally:
        await bus.close()
    assert set(found) == ids, f"{len(ids - set(found))} missing from {topic}"
    return list(found.values())


def _topics(objective: str) -> list[str]:
    base = f"persistent://public/default/rdv.{objective}"
    return [
        f"{base}.{name}" for name in ("requests", "tasks", "results", "archive", "feedback")
    ] + ["persistent://public/default/rdv.control.objectives"]


def _topic_snapshot(pulsar: PulsarBroker, objective: str) -> dict[str, Any]:
    """Per topic: messages ever published and the durable subscriptions (None: no topic)."""
    snapshot: dict[str, Any] = {}
    for topic in _topics(objective):
        try:
            topic_stats = pulsar.topic_stats(topic)
        except urllib.error.HTTPError:
            snapshot[topic] = None
            continue
        durable = sorted(
            name
            for name, sub in topic_stats.get("subscriptions", {}).items()
            if sub.get("isDurable", True)
        )
        snapshot[topic] = (topic_stats["msgInCounter"], durable)
    return snapshot


@pytest.fixture(scope="module")
def recorded(pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    objective = f"replay{uuid.uuid4().hex[:6]}"
    document = mesh_document(objective, f"127.0.0.1:{free_port()}")
    with supervised_mesh(pulsar, tmp_path_factory.mktemp("replay"), document) as mesh:
        _, all_targets = _rows()
        run = uuid.uuid4().hex[:6]
        first = [(f"{run}-a{index}", index) for index in range(BATCH)]
        second = [(f"{run}-b{index}", BATCH + index) for index in range(BATCH)]
        denied = {rid for rid, row in first + second if row % DENY_EVERY == DENY_EVERY - 1}
        asyncio.run(_send(mesh.endpoint, objective, first, denied))
        time.sleep(GAP_S)
        mid = datetime.now(UTC)
        time.sleep(GAP_S)
        asyncio.run(_send(mesh.endpoint, objective, second, denied))
        targets = {rid: all_targets[row] for rid, row in first + second}
        asyncio.run(_publish_feedback(pulsar, objective, targets))
        ids = set(targets)
        archive = asyncio.run(
            _read_ours(
                pulsar,
                f"persistent://public/default/rdv.{objective}.archive",
                task_pb2.ArchiveRecord,
                ids,
                lambda record: record.task.task.request.request_id,
            )
        )
        outcomes = asyncio.run(
            _read_ours(
                pulsar,
                f"persistent://public/default/rdv.{objective}.results",
                task_pb2.Outcome,
                ids,
                lambda outcome: outcome.request_id,
            )
        )
        # Sealed under each subject's key (every request names a subject): opened as the
        # evaluator and the replay open them.
        outcomes = asyncio.run(mesh.open_records(outcomes))
        incumbent_scores = {
            outcome.request_id: candidate.prediction.prediction.score
            for outcome in outcomes
            for candidate in outcome.candidates
            if candidate.prediction.model == INCUMBENT
            and candidate.prediction.WhichOneof("result") == "prediction"
        }
        yield Recorded(
            objective=objective,
            mesh=mesh,
            mid=mid,
            targets=targets,
            denied=denied,
            archived={
                record.task.task.request.request_id: (
                    record.task.task.received_time.ToNanoseconds(),
                    not record.features_dropped,
                )
                for record in archive
            },
            incumbent_scores=incumbent_scores,
            topics_before=_topic_snapshot(pulsar, objective),
        )


def _cli(recorded: Recorded, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            # The mesh's state: the broker comes from it, as after `rendezvous up`.
            "--state-dir",
            str(recorded.mesh.state_dir),
            "replay",
            "--objective",
            recorded.objective,
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
        check=False,
    )


def _settings(pulsar: PulsarBroker, mesh: RunningMesh) -> ReplaySettings:
    # The mesh's keyring opens the sealed archive and outcomes.
    return ReplaySettings(
        pulsar=pulsar.settings(),
        resamples=2000,
        privacy=PrivacySettings(keyring=mesh.keyring_endpoint),
    )


def _replay(
    pulsar: PulsarBroker, recorded: Recorded, source: ModelSource, window: Window
) -> ReplayReport:
    options = ReplayOptions(
        objective=recorded.objective,
        source=source,
        window=window,
        rate=REPLAY_RATE * 2,
        max_in_flight=8,
        call_timeout_s=2.0,
    )
    return asyncio.run(run_replay(options, _settings(pulsar, recorded.mesh)))


def test_refuses_a_model_of_the_live_mesh(recorded: Recorded) -> None:
    done = _cli(recorded, "--model", INCUMBENT, "--kind", "diabetes")
    assert done.returncode == EXIT_USAGE, done.stderr
    assert f"{INCUMBENT!r} is a deployment of" in done.stderr
    assert "Traceback" not in done.stderr
    # An endpoint of the live mesh is refused too: the replay's load must not reach it.
    incumbent = recorded.mesh.process(f"model-{INCUMBENT}")["endpoint"]
    done = _cli(recorded, "--model", "elsewhere", "--endpoint", incumbent)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "endpoint of the live mesh" in done.stderr


def test_a_twin_of_the_incumbent_agrees_and_is_inconclusive(
    recorded: Recorded, pulsar: PulsarBroker, tmp_path: Path
) -> None:
    out = tmp_path / "replay.json"
    done = _cli(
        recorded,
        "--model",
        "ridge-twin",
        "--kind",
        "diabetes",
        "--args",
        '{"algorithm": "ridge"}',
        "--rate",
        f"{REPLAY_RATE:g}",
        "--json",
        str(out),
    )
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    counts = report["counts"]
    replayable = {rid for rid, (_, ok) in recorded.archived.items() if ok}
    assert counts["replayed"] == len(replayable) == len(recorded.targets) - len(recorded.denied)
    assert counts["skipped_features_dropped"] == len(recorded.denied)
    assert counts["succeeded"] == counts["replayed"]
    assert counts["errors"] == {}
    # The bound held: n calls spaced 1/rate apart.
    assert report["duration_s"] >= (counts["replayed"] - 1) / REPLAY_RATE * RATE_TOLERANCE
    assert report["latency_s"]["p50"] is not None
    # A live model may have missed a few requests (late past the grace, shed on a busy
    # machine): the pairs are the requests both scored.
    scored = {rid for rid in replayable if rid in recorded.incumbent_scores}
    assert len(scored) >= len(replayable) * 0.9
    agreement = {row["model"]: row for row in report["agreement"]}
    assert agreement[INCUMBENT]["pairs"] == len(scored)
    assert agreement[INCUMBENT]["mean_absolute_difference"] < 1e-9
    assert agreement[INCUMBENT]["spearman"] > 0.99
    assert {"feature-sum", "canary-linear", "(answered)"} <= set(agreement)
    assert agreement["(answered)"]["pairs"] == len(replayable)
    (truth,) = report["ground_truth"]
    assert truth["kind"] == "regression"
    assert truth["labelled"] == len(replayable)
    errors = {row["model"]: row for row in truth["errors"]}
    assert errors["ridge-twin"]["n"] == errors["(answered)"]["n"] == len(replayable)
    assert errors[INCUMBENT]["n"] == len(scored)
    # The latest feedback won: the incumbent's MAE is the one against the true targets.
    expected = sum(
        abs(recorded.incumbent_scores[rid] - recorded.targets[rid]) for rid in scored
    ) / len(scored)
    assert errors[INCUMBENT]["mae"] == pytest.approx(expected, rel=1e-9)
    # Same scores, same error on every request both scored.
    versus = truth["replay_vs_incumbent"]
    assert versus["baseline"] == INCUMBENT
    assert versus["pairs"] == len(scored)
    assert abs(versus["mean_diff"]) < 1e-9
    assert abs(versus["ci_low"]) < 1e-9 and abs(versus["ci_high"]) < 1e-9
    assert versus["verdict"] == "inconclusive"


def test_a_worse_model_is_worse(recorded: Recorded, pulsar: PulsarBroker) -> None:
    report = _replay(pulsar, recorded, ModelSource("sum-shadow", kind="sum"), Window())
    (truth,) = report.ground_truth
    assert truth.replay is not None
    assert truth.replay.verdict == "worse"
    assert truth.replay.interval.low > 0
    assert not report.counts.errors


def test_since_and_until_select_the_window(recorded: Recorded, pulsar: PulsarBroker) -> None:
    mid = recorded.mid.isoformat()
    now = datetime.now(UTC)
    boundary = Window.parse(mid, None, now).since_ns
    assert boundary is not None
    twin = ModelSource("ridge-window", kind="diabetes", args={"algorithm": "ridge"})
    later = _replay(pulsar, recorded, twin, Window.parse(mid, None, now))
    earlier = _replay(pulsar, recorded, twin, Window.parse(None, mid, now))
    replayable_after = sum(1 for ns, ok in recorded.archived.values() if ok and ns >= boundary)
    replayable_before = sum(1 for ns, ok in recorded.archived.values() if ok and ns < boundary)
    assert replayable_after and replayable_before
    assert later.counts.replayed == replayable_after
    assert earlier.counts.replayed == replayable_before
    assert later.counts.outside_window == sum(
        1 for ns, _ in recorded.archived.values() if ns < boundary
    )


def test_live_topics_saw_nothing_of_the_replays(recorded: Recorded, pulsar: PulsarBroker) -> None:
    # Runs last in this module: every replay above is done.
    assert _topic_snapshot(pulsar, recorded.objective) == recorded.topics_before
