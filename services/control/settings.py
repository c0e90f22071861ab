"""Settings of the control plane (env prefix `RDV_CONTROL_`, YAML section `control`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class ControlSettings(ServiceSettings):
    """Where the control plane listens, what it seeds from, and how long it waits."""

    model_config = SettingsConfigDict(env_prefix="RDV_CONTROL_")
    config_section: ClassVar[str] = "control"

    listen: str = "127.0.0.1:50052"
    # `mesh_file` (inherited) seeds version 1 of each of its objectives the topic lacks.
    # The author of the seed versions.
    seed_author: str = "rendezvous-control"
    # Refuse an update whose policy newly accepts a model no runner host reports ready.
    require_ready_runners: bool = True
    # Pause before a failed read of the control or runner-status topic is tried again.
    retry_delay_s: float = Field(default=0.5, gt=0)
    # How long an update may take: the publish, then this process seeing it on the topic.
    update_timeout_s: float = Field(default=10.0, gt=0)
    # Pause between attempts to become the topic's one writer while another instance is.
    standby_retry_s: float = Field(default=2.0, gt=0)
    # Each admin REST call (topic creation, policies, compaction) gives up after this long.
    admin_timeout_s: float = Field(default=5.0, gt=0)
    # Attempts at setting the topic's policies before start-up fails (the broker may be busy).
    admin_attempts: int = Field(default=5, ge=1)
    # Pulsar compacts the topic by itself once its uncompacted backlog passes this size;
    # the control plane also asks for a compaction after every change.
    compaction_threshold_bytes: int = Field(default=1024 * 1024, ge=0)
