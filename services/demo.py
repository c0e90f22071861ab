"""`rendezvous demo`: real traffic through a running mesh, then a per-model report.

Requests are rows of scikit-learn's diabetes dataset sent open-loop at a fixed
rate. Who answered comes from the responses; each model's latency (arrival
after the request, answered or not, late ones too), errors and late counts come
from the outcomes the rendezvous published on the objective's results topic.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence

import grpc
from rendezvous.v1 import feedback_pb2, feedback_pb2_grpc, scoring_pb2, scoring_pb2_grpc, task_pb2

from services.core.bus import PulsarBus
from services.core.protos import duration_ms, set_values
from services.core.settings import PulsarSettings


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
    target: str, objective: str, observed: Sequence[tuple[str, float]], concurrency: int = 16
) -> Counter[str]:
    """Record each (request id, observed value) with FeedbackService at `target`; the count of
    each outcome ("OK" or a status code name)."""
    outcomes: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
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


async def _send_all(
    target: str, objective: str, requests: int, rate: float, run_id: str
) -> list[scoring_pb2.ScoreResponse | grpc.aio.AioRpcError]:
    rows = diabetes_rows()
    async with grpc.aio.insecure_channel(target) as channel:
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


async def _outcomes(
    pulsar_url: str, objective: str, run_id: str, expected: int, wait_s: float
) -> list[task_pb2.Outcome]:
    bus = PulsarBus(PulsarSettings(service_url=pulsar_url), "demo")
    found: list[task_pb2.Outcome] = []
    try:
        reader = await bus.reader(bus.topics.results(objective), task_pb2.Outcome)
        deadline = time.monotonic() + wait_s
        while len(found) < expected and time.monotonic() < deadline:
            try:
                envelope = await asyncio.wait_for(reader.read_next(), deadline - time.monotonic())
            except TimeoutError:
                break
            if envelope.message.request_id.startswith(run_id):
                found.append(envelope.message)
        await reader.close()
    finally:
        await bus.close()
    return found


async def run_demo(target: str, objective: str, requests: int, rate: float, pulsar_url: str) -> int:
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    print(f"Sending {requests} requests at {rate:g}/s to {target} (objective {objective!r}) ...")
    results = await _send_all(target, objective, requests, rate, run_id)
    responses = [r for r in results if isinstance(r, scoring_pb2.ScoreResponse)]
    failures = Counter(r.code().name for r in results if isinstance(r, grpc.aio.AioRpcError))
    answered = Counter(r.decision.model or "(default)" for r in responses)
    elapsed = [duration_ms(r.elapsed) for r in responses]
    print("Waiting for the outcomes (late predictions are kept for the grace window) ...")
    outcomes = await _outcomes(pulsar_url, objective, run_id, len(responses), wait_s=15.0)

    arrivals: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for outcome in outcomes:
        for candidate in outcome.candidates:
            model = candidate.prediction.model
            arrivals[model].append(duration_ms(candidate.arrival))
            counts[model][task_pb2.CandidateStatus.Name(candidate.status)] += 1

    print(
        f"\n{len(responses)} answered, {sum(failures.values())} failed {dict(failures) or ''}; "
        f"answer time p50 {quantile(elapsed, 0.5):.1f} ms, p99 {quantile(elapsed, 0.99):.1f} ms"
    )
    print(f"outcomes read from the results topic: {len(outcomes)}\n")
    header = (
        f"{'model':18} {'answered':>9} {'share':>7} {'predictions':>11} {'errors':>7} "
        f"{'late':>5} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7}"
    )
    print(header)
    print("-" * len(header))
    models = sorted(set(arrivals) | {m for m in answered if m != "(default)"})
    for model in models:
        latencies = arrivals.get(model, [])
        status = counts[model]
        print(
            f"{model:18} {answered.get(model, 0):>9} "
            f"{answered.get(model, 0) / max(len(responses), 1):>7.1%} {len(latencies):>11} "
            f"{status['CANDIDATE_STATUS_ERROR']:>7} {status['CANDIDATE_STATUS_LATE']:>5} "
            f"{quantile(latencies, 0.5):>7.1f} {quantile(latencies, 0.9):>7.1f} "
            f"{quantile(latencies, 0.99):>7.1f}"
        )
    defaults = answered.get("(default)", 0)
    print(f"{'(default)':18} {defaults:>9} {defaults / max(len(responses), 1):>7.1%}")
    return 0 if responses and not failures else 1
