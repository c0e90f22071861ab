"""Settings of the evaluator (env prefix `RDV_EVALUATOR_`, YAML section `evaluator`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings
from services.evaluator import stats
from services.evaluator.report import DriftSettings, ReportSettings
from services.evaluator.store import StoreLimits


class EvaluatorSettings(ServiceSettings):
    """Where the evaluator listens, what it keeps, and how it computes the report."""

    model_config = SettingsConfigDict(env_prefix="RDV_EVALUATOR_")
    config_section: ClassVar[str] = "evaluator"

    listen: str = "127.0.0.1:50053"
    # The live dashboard's HTTP address ("" = no dashboard).
    dashboard_listen: str = "127.0.0.1:8053"
    # The dashboard page re-fetches its figures this often, over this default window.
    dashboard_refresh_s: float = Field(default=5.0, gt=0)
    dashboard_window_s: float = Field(default=900.0, gt=0)
    # Evaluate only these objectives of the control topic (empty: every one it holds).
    serve_only: list[str] = Field(default_factory=list)
    retry_delay_s: float = Field(default=0.5, gt=0)
    # How long start-up may take to read the retained history before serving anyway (the
    # report says what it holds; a long history must not keep the process unready forever).
    catch_up_timeout_s: float = Field(default=120.0, gt=0)
    # Feedback published by Record must be on the topic within this long.
    publish_timeout_s: float = Field(default=5.0, gt=0)

    # The store (services/evaluator/store.py).
    bucket_width_s: float = Field(default=10.0, gt=0)
    retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    max_records: int = Field(default=200_000, ge=100)
    max_pending_feedback: int = Field(default=200_000, ge=1)

    # The report (services/evaluator/report.py).
    confidence: float = Field(default=0.95, gt=0, lt=1)
    bootstrap_resamples: int = Field(default=2_000, ge=100)
    timeline_points: int = Field(default=60, ge=1, le=1000)
    score_bins: int = Field(default=20, ge=2, le=200)
    # Canary drift: PSI of the last drift_recent_s against the drift_reference_s before.
    drift_recent_s: float = Field(default=120.0, gt=0)
    drift_reference_s: float = Field(default=600.0, gt=0)
    drift_min_scores: int = Field(default=400, ge=10)
    drift_threshold: float = Field(default=stats.PSI_ALARM, gt=0)
    # The drift alarm (metric and log) is checked this often.
    drift_check_s: float = Field(default=5.0, gt=0)

    @property
    def limits(self) -> StoreLimits:
        return StoreLimits(
            bucket_width_s=self.bucket_width_s,
            retention_s=self.retention_s,
            max_records=self.max_records,
            max_pending_feedback=self.max_pending_feedback,
        )

    @property
    def report(self) -> ReportSettings:
        return ReportSettings(
            confidence=self.confidence,
            bootstrap_resamples=self.bootstrap_resamples,
            drift=DriftSettings(
                recent_s=self.drift_recent_s,
                reference_s=self.drift_reference_s,
                min_scores=self.drift_min_scores,
                threshold=self.drift_threshold,
            ),
            timeline_points=self.timeline_points,
            score_bins=self.score_bins,
        )
