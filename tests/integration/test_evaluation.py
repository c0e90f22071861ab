"""Live evaluation on the real broker: the evaluator says which model is better, and when the
inputs shift.

One supervised mesh (control plane, models, runners, rendezvous, collector, evaluator) scores
the diabetes dataset's rows. The incumbent is an under-fitted ridge (the committed ridge
artifact with its coefficients shrunk to a third, as a too-strong penalty would leave them:
in-sample MAE about 52 against 43); one challenger is ordinary least squares, which fits the
rows better, the other sums the features (a score near 0 for targets near 150).
The real targets go in through FeedbackService.Record; GetEvaluationReport must then call the
first challenger better and the second worse, each with the right sign and a 95 % interval
that excludes zero, from errors paired on the same requests.

Then the canary drift: more unshifted traffic raises no alarm; traffic whose inputs are
shifted (bmi and s5 up by two of their standard deviations) moves the canary's scores and
raises it, in the report, the metric and the evaluator's log.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from rendezvous.v1 import (
    common_pb2,
    evaluation_pb2,
    evaluation_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)

from services.core.protos import set_values
from services.demo import diabetes_dataset, record_feedback
from services.models.diabetes import DiabetesArtifact, artifact_path
from services.supervisor.plan import free_port
from tests.browser.fixtures import WatchedPage
from tests.conftest import PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh

pytestmark = pytest.mark.integration

OBJECTIVE = "evaluated"
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
RATE = 40.0
# Short drift windows so the test sees a shift within seconds.
DRIFT_RECENT_S = 8
DRIFT_REFERENCE_S = 16
# The diabetes features are scaled to a standard deviation of about 0.0476.
SHIFT = 2 * 0.0476


# The under-fitted incumbent keeps this share of the ridge coefficients.
SHRINK = 1 / 3


def weak_ridge(directory: Path) -> Path:
    """The committed ridge artifact with its coefficients shrunk: a known worse model."""
    artifact = DiabetesArtifact.load(artifact_path("ridge"))
    weak = artifact.model_copy(update={"coefficients": [c * SHRINK for c in artifact.coefficients]})
    path = directory / "diabetes-ridge-weak.json"
    path.write_text(weak.dump())
    return path


def mesh_document(listen: str, weak_artifact: Path) -> dict[str, Any]:
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            OBJECTIVE: {
                "sla_ms": 150,
                "late_grace_ms": 1000,
                "enrichment": "none",
                "features": [{"name": name} for name in FEATURES],
                "models": [
                    {
                        "name": "ridge",
                        "role": "incumbent",
                        "kind": "diabetes",
                        "args": {"algorithm": "ridge", "artifact": str(weak_artifact)},
                    },
                    {
                        "name": "ols",
                        "role": "challenger",
                        "kind": "diabetes",
                        "args": {"algorithm": "linear"},
                    },
                    {"name": "summed", "role": "challenger", "kind": "sum"},
                    {
                        "name": "canary",
                        "role": "canary",
                        "kind": "diabetes",
                        "args": {"algorithm": "linear"},
                    },
                    {"name": "decoy", "role": "decoy"},
                ],
                "policy": [
                    {"until_ms": 100, "accept": ["ridge"]},
                    {"until_ms": 140, "accept": ["ridge", "canary"]},
                ],
                "default": {"score": 152.13},
                "sampling": {"challenger_fraction": 1.0, "archive_fraction": 1.0},
            }
        },
    }


@pytest.fixture(scope="module")
def mesh(pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    root = tmp_path_factory.mktemp("evaluation")
    env = {
        "RDV_EVALUATOR_DRIFT_RECENT_S": str(DRIFT_RECENT_S),
        "RDV_EVALUATOR_DRIFT_REFERENCE_S": str(DRIFT_REFERENCE_S),
        "RDV_EVALUATOR_DRIFT_CHECK_S": "1",
        # 320 recent and 640 reference scores: PSI's noise floor is about 0.04.
        "RDV_EVALUATOR_DRIFT_MIN_SCORES": "200",
        "RDV_EVALUATOR_BUCKET_WIDTH_S": "1",
    }
    with supervised_mesh(
        pulsar, root, mesh_document(f"127.0.0.1:{free_port()}", weak_ridge(root)), env=env
    ) as running:
        yield running


def _evaluator(mesh: RunningMesh) -> str:
    return str(mesh.process("evaluator")["endpoint"])


async def _score_rows(
    endpoint: str, rows: list[dict[str, float]], run_id: str, shift: float = 0.0
) -> list[str]:
    """Score every row once at RATE; the request ids answered OK."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        started = time.monotonic()
        calls = []
        for index, row in enumerate(rows):
            request = scoring_pb2.ScoreRequest(
                objective=OBJECTIVE, request_id=f"{run_id}-{index}", subject_id=f"s-{index}"
            )
            shifted = dict(row)
            shifted["bmi"] += shift
            shifted["s5"] += shift
            set_values(request.features, shifted)
            await asyncio.sleep(max(0.0, started + index / RATE - time.monotonic()))
            calls.append(asyncio.ensure_future(stub.Score(request, timeout=5.0)))
        answers = await asyncio.gather(*calls)
    return [a.request_id for a in answers]


async def _report(
    endpoint: str, request: evaluation_pb2.GetEvaluationReportRequest
) -> evaluation_pb2.GetEvaluationReportResponse:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = evaluation_pb2_grpc.EvaluationServiceStub(channel)
        response: evaluation_pb2.GetEvaluationReportResponse = await stub.GetEvaluationReport(
            request, timeout=30.0
        )
        return response


async def _report_when(
    endpoint: str, ready: Any, timeout_s: float = 30.0
) -> evaluation_pb2.GetEvaluationReportResponse:
    """The objective's report once `ready(report)` holds (the evaluator reads the topics
    asynchronously), or the last one seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = await _report(
            endpoint, evaluation_pb2.GetEvaluationReportRequest(objective=OBJECTIVE)
        )
        if ready(report) or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.5)


def _by_model(
    report: evaluation_pb2.GetEvaluationReportResponse,
) -> dict[str, evaluation_pb2.ModelEvaluation]:
    return {m.model: m for m in report.models}


@pytest.mark.asyncio
async def test_better_and_worse_challengers_are_told_apart_with_confidence(
    mesh: RunningMesh,
) -> None:
    rows, targets = diabetes_dataset()
    ids = await _score_rows(mesh.endpoint, rows, f"eval-{uuid.uuid4().hex[:6]}")
    assert len(ids) == len(rows)
    recorded = await record_feedback(
        _evaluator(mesh), OBJECTIVE, list(zip(ids, targets, strict=True))
    )
    assert recorded == {"OK": len(ids)}

    report = await _report_when(
        _evaluator(mesh),
        lambda r: (
            r.labelled_requests >= len(ids)
            and all(
                m.versus_incumbent.pairs >= len(ids) * 0.95
                for m in r.models
                if m.role == common_pb2.MODEL_ROLE_CHALLENGER
            )
        ),
    )
    models = _by_model(report)
    assert report.requests >= len(ids)
    assert report.labelled_requests == len(ids)
    assert report.target_kind == evaluation_pb2.TARGET_KIND_REGRESSION
    ridge, ols, summed = models["ridge"], models["ols"], models["summed"]
    assert ridge.error.labelled >= len(ids) * 0.95
    # OLS fits the rows better than ridge; the sum of the features is far off.
    assert ols.error.regression.mae < ridge.error.regression.mae < summed.error.regression.mae

    better = ols.versus_incumbent
    assert better.baseline_model == "ridge"
    assert better.error_measure == "absolute_error"
    assert better.pairs >= len(ids) * 0.95
    assert better.mean_difference < 0
    assert better.ci_low <= better.mean_difference <= better.ci_high < 0
    assert better.verdict == evaluation_pb2.COMPARISON_VERDICT_BETTER
    # The paired mean difference is the difference of the MAEs on the same requests.
    assert better.mean_difference == pytest.approx(
        ols.error.regression.mae - ridge.error.regression.mae, abs=2.0
    )

    worse = summed.versus_incumbent
    assert 0 < worse.ci_low <= worse.mean_difference <= worse.ci_high
    assert worse.verdict == evaluation_pb2.COMPARISON_VERDICT_WORSE
    assert worse.confidence == pytest.approx(0.95)

    # What users got: the incumbent answered (nearly) everything, so the answered error is
    # the incumbent's.
    assert report.answered_error.regression.mae == pytest.approx(
        ridge.error.regression.mae, rel=0.05
    )
    # Agreement: OLS orders requests much like ridge; the sum does not know the scale.
    assert ols.rank_correlation_with_incumbent > 0.8
    assert ols.agreement_with_incumbent < summed.agreement_with_incumbent
    assert ridge.win_share > 0.9
    for model in (ridge, ols, summed):
        assert model.predictions >= len(ids) * 0.95
        assert 0 < model.latency_p50.ToNanoseconds() <= model.latency_p99.ToNanoseconds()


@pytest.mark.asyncio
async def test_bad_feedback_and_report_requests_get_field_level_errors(mesh: RunningMesh) -> None:
    async with grpc.aio.insecure_channel(_evaluator(mesh)) as channel:
        feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
        evaluation = evaluation_pb2_grpc.EvaluationServiceStub(channel)
        cases: list[tuple[Any, grpc.StatusCode, str]] = [
            (
                feedback.Record(feedback_pb2.RecordRequest(objective=OBJECTIVE, value=1.0)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "request_id",
            ),
            (
                feedback.Record(feedback_pb2.RecordRequest(objective=OBJECTIVE, request_id="r")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "observed",
            ),
            (
                feedback.Record(
                    feedback_pb2.RecordRequest(objective=OBJECTIVE, request_id="r", value=math.inf)
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "value",
            ),
            (
                feedback.Record(
                    feedback_pb2.RecordRequest(objective="nope", request_id="r", value=1.0)
                ),
                grpc.StatusCode.NOT_FOUND,
                "nope",
            ),
            (
                evaluation.GetEvaluationReport(evaluation_pb2.GetEvaluationReportRequest()),
                grpc.StatusCode.INVALID_ARGUMENT,
                "objective",
            ),
        ]
        for call, code, mentioned in cases:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == code
            assert mentioned in (raised.value.details() or "") or code != grpc.StatusCode.NOT_FOUND
            assert "Traceback" not in (raised.value.details() or "")


def _metric(mesh: RunningMesh, name: str) -> float | None:
    address = mesh.process("evaluator")["metrics"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'objective="{OBJECTIVE}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.asyncio
async def test_the_canary_raises_a_drift_alarm_when_inputs_shift_and_only_then(
    mesh: RunningMesh,
) -> None:
    rows, _ = diabetes_dataset()
    length = int(RATE * (DRIFT_RECENT_S + DRIFT_REFERENCE_S + 2))
    steady = [rows[i % len(rows)] for i in range(length)]
    await _score_rows(mesh.endpoint, steady, f"steady-{uuid.uuid4().hex[:6]}")
    steady_report = await _report_when(
        _evaluator(mesh), lambda r: r.canary_drift.recent_count >= RATE * DRIFT_RECENT_S * 0.8
    )
    drift = steady_report.canary_drift
    assert drift.model == "canary"
    assert drift.statistic_name == "psi"
    assert drift.reference_count >= 200 and drift.recent_count >= 200
    assert drift.statistic < drift.threshold, steady_report.canary_drift
    assert not drift.alarm
    await asyncio.sleep(2)  # the alarm check runs every second
    assert _metric(mesh, "rdv_evaluator_canary_drift_alarm") == 0.0

    shifted = [rows[i % len(rows)] for i in range(int(RATE * (DRIFT_RECENT_S + 1)))]
    await _score_rows(mesh.endpoint, shifted, f"shifted-{uuid.uuid4().hex[:6]}", shift=SHIFT)
    shifted_report = await _report_when(_evaluator(mesh), lambda r: r.canary_drift.alarm)
    drift = shifted_report.canary_drift
    assert drift.alarm, drift
    assert drift.statistic > drift.threshold
    await asyncio.sleep(2)
    assert _metric(mesh, "rdv_evaluator_canary_drift_alarm") == 1.0
    log_file = Path(mesh.state_dir) / "logs" / "evaluator.log"
    assert "canary drift alarm raised" in log_file.read_text()


@pytest.mark.browser
@pytest.mark.asyncio
async def test_the_real_evaluators_dashboard_draws_the_live_figures(
    mesh: RunningMesh, watched: WatchedPage, tmp_path: Path
) -> None:
    """The dashboard the evaluator serves, in headless Chromium, on the figures of the
    traffic above: it loads, every chart has data marks, no console error; and `rendezvous
    report` writes the same page as a file."""
    dashboard = mesh.state()["dashboard_url"]
    await watched.page.goto(f"{dashboard}?objective={OBJECTIVE}&window_s=3600")
    await watched.rendered(times=2)  # rendered, then refreshed from the API
    for chart in ("latency", "win-share", "error", "scores", "drift"):
        assert await watched.count(f"[data-chart={chart}] .no-data") == 0, chart
    assert await watched.count("[data-chart=latency] path.series") >= 4
    assert await watched.count("[data-chart=error] path.series") >= 3
    assert await watched.count("[data-chart=scores] rect.bar") > 0
    assert await watched.count("[data-chart=drift] circle.alarm") >= 1
    assert watched.errors == []

    out = tmp_path / "report.html"
    printed = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "services.cli",
            "--state-dir",
            str(mesh.state_dir),
            "report",
            "--objective",
            OBJECTIVE,
            "--since",
            "1h",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert printed.returncode == 0, printed.stderr
    assert "ols" in printed.stdout and "better" in printed.stdout
    await watched.page.goto(out.as_uri())
    await watched.rendered()
    assert await watched.count("[data-chart=scores] rect.bar") > 0
    assert watched.errors == []
