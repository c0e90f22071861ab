"""`rendezvous demo`: real traffic through a running mesh, the ground truth, then the
evaluator's report.

Requests are rows of scikit-learn's diabetes dataset sent open-loop at a fixed rate. Each
row's real target is then recorded with FeedbackService, as the observed outcome would be
once known, and the evaluator's report of the run's window is printed: per model its wins,
latency, agreement with the incumbent, error against the targets and the paired comparison
with the incumbent (`docs/evaluation.md`).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from collections.abc import Sequence

import grpc
from google.protobuf import timestamp_pb2
from rendezvous.v1 import (
    evaluation_pb2,
    evaluation_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)

from services.core import client
from services.core.protos import duration_ms, now_timestamp, set_values
from services.core.settings import TlsSettings


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def diabetes_dataset() -> tuple[list[dict[str, float]], list[float]]:
    """The diabetes dataset's rows (scaled features by name) and their real targets (disease
    progression one year later): the targets are the ground truth the demo records."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    names = list(data.feature_names)
    rows = [dict(zip(names, map(float, row), strict=True)) for row in data.data]
    return rows, [float(t) for t in data.target]


def diabetes_rows() -> list[dict[str, float]]:
    return diabetes_dataset()[0]


async def record_feedback(
    target: str,
    objective: str,
    observed: Sequence[tuple[str, float]],
    concurrency: int = 16,
    tls: TlsSettings | None = None,
) -> Counter[str]:
    """Record each (request id, observed value) with FeedbackService at `target`; the count of
    each outcome ("OK" or a status code name)."""
    outcomes: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)
    async with client.aio_channel(target, tls) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)

        async def one(request_id: str, value: float) -> None:
            async with gate:
                try:
                    await stub.Record(
                        feedback_pb2.RecordRequest(
                            objective=objective, request_id=request_id, value=value
                        ),
                        timeout=10.0,
                    )
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    outcomes[error.code().name] += 1

        await asyncio.gather(*(one(rid, value) for rid, value in observed))
    return outcomes


async def _send_all(  # noqa: PLR0917 (the run's knobs)
    target: str, objective: str, requests: int, rate: float, run_id: str, tls: TlsSettings | None
) -> list[scoring_pb2.ScoreResponse | grpc.aio.AioRpcError]:
    rows = diabetes_rows()
    async with client.aio_channel(target, tls) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        started = time.monotonic()
        calls = []
        for index in range(requests):
            request = scoring_pb2.ScoreRequest(
                objective=objective, request_id=f"{run_id}-{index}", subject_id=f"user-{index % 50}"
            )
            set_values(request.features, rows[index % len(rows)])
            # Open loop: the schedule does not wait for answers.
            await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
            calls.append(asyncio.ensure_future(stub.Score(request, timeout=5.0)))
        return list(await asyncio.gather(*calls, return_exceptions=True))  # type: ignore[arg-type]


async def _report_when_complete(  # noqa: PLR0917 (the run's coordinates)
    evaluator: str,
    objective: str,
    since: timestamp_pb2.Timestamp,
    expected: int,
    wait_s: float,
    tls: TlsSettings | None,
) -> evaluation_pb2.GetEvaluationReportResponse:
    """The evaluator's report of the run's window once it holds the run's outcomes and their
    feedback (it reads the topics as they come), or the last one after `wait_s`."""
    request = evaluation_pb2.GetEvaluationReportRequest(objective=objective, start_time=since)
    deadline = time.monotonic() + wait_s
    async with client.aio_channel(evaluator, tls) as channel:
        stub = evaluation_pb2_grpc.EvaluationServiceStub(channel)
        while True:
            report: evaluation_pb2.GetEvaluationReportResponse = await stub.GetEvaluationReport(
                request, timeout=60.0
            )
            complete = report.requests >= expected and report.labelled_requests >= expected
            if complete or time.monotonic() > deadline:
                return report
            await asyncio.sleep(0.5)


async def run_demo(  # noqa: PLR0917 (the command line's knobs)
    target: str,
    objective: str,
    requests: int,
    rate: float,
    evaluator: str,
    tls: TlsSettings | None = None,
) -> int:
    from services.evaluator.html import summary_text

    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    since = now_timestamp()
    print(f"Sending {requests} requests at {rate:g}/s to {target} (objective {objective!r}) ...")
    results = await _send_all(target, objective, requests, rate, run_id, tls)
    responses = [r for r in results if isinstance(r, scoring_pb2.ScoreResponse)]
    failures = Counter(r.code().name for r in results if isinstance(r, grpc.aio.AioRpcError))
    elapsed = [duration_ms(r.elapsed) for r in responses]
    print(
        f"{len(responses)} answered, {sum(failures.values())} failed {dict(failures) or ''}; "
        f"answer time seen by this client p50 {quantile(elapsed, 0.5):.1f} ms, "
        f"p99 {quantile(elapsed, 0.99):.1f} ms"
    )
    # The ground truth: each row's real target (disease progression a year later), recorded
    # as it would be once observed.
    _, targets = diabetes_dataset()
    observed = [
        (r.request_id, targets[int(r.request_id.rsplit("-", 1)[1]) % len(targets)])
        for r in responses
    ]
    print(f"Recording {len(observed)} observed targets with FeedbackService at {evaluator} ...")
    recorded = await record_feedback(evaluator, objective, observed, tls=tls)
    print(f"feedback: {dict(recorded)}")
    print("Waiting for the evaluator (late predictions are kept for the grace window) ...\n")
    report = await _report_when_complete(evaluator, objective, since, len(responses), 30.0, tls)
    print(summary_text(report))
    print(f"\nMore: rendezvous report --objective {objective} (HTML), the live dashboard")
    return 0 if responses and not failures and recorded.get("OK") == len(observed) else 1
