"""Settings of the collector sidecar."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class CollectorSettings(ServiceSettings):
    """Which rendezvous instance this collector serves, and how it delivers."""

    model_config = SettingsConfigDict(env_prefix="RDV_COLLECTOR_")
    config_section: ClassVar[str] = "collector"

    # Must equal the rendezvous instance's name: it selects the return-address topic.
    instance: str
    delivery_socket: Path = Path(tempfile.gettempdir()) / "rendezvous" / "delivery.sock"
    subscription: str = "collector"
    # Predictions sent on the stream and not yet answered; receiving pauses beyond it.
    max_unanswered: int = 2000
    # Most predictions in one DeliverRequest: those received together go together.
    max_burst: int = Field(default=64, ge=1)
    reconnect_initial_s: float = 0.05
    reconnect_max_s: float = 1.0
