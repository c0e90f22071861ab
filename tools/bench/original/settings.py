"""Settings of S3, the original design (env prefix RDV_ORIGINAL_), shared by app and collector.

The bench harness (`tools.bench.original.start`) sets them as environment variables on
the gunicorn and collector processes it starts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OriginalSettings(BaseSettings):
    """Where the broker is, which topics S3 uses, where mailboxes live, the policy's timeout."""

    model_config = SettingsConfigDict(env_prefix="RDV_ORIGINAL_", extra="forbid")

    pulsar_url: str = "pulsar://127.0.0.1:6650"
    tenant_namespace: str = "public/default"
    # S3 publishes onto the tasks topic of its own objective, consumed by our model runners.
    objective: str = Field(default="original", min_length=1)
    # Names S3's prediction topic (the return address the runners publish to).
    instance: str = Field(default="s3", min_length=1)
    # One unix socket per request lives here, named after the request's mailbox id.
    socket_dir: Path = Path("/tmp/rdv-s3")
    # The original's policy: wait this long for the first score, then answer the default.
    # 50 ms is the demo objective's SLA, the same budget our rendezvous gets.
    timeout_s: float = Field(default=0.05, gt=0)
    # The demo objective's static default answer.
    default_score: float = 152.13
    # Ceiling of one publish; a request whose publish fails answers the default.
    send_timeout_ms: int = Field(default=5000, ge=1)
    # Deliveries in flight at once in the collector.
    collector_concurrency: int = Field(default=256, ge=1)
    collector_ready_file: Path | None = None
    log_level: str = "WARNING"
