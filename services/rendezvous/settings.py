"""Settings of the rendezvous service."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class RendezvousSettings(ServiceSettings):
    """One rendezvous instance: its public endpoint, its collector socket, its limits."""

    model_config = SettingsConfigDict(env_prefix="RDV_RENDEZVOUS_")
    config_section: ClassVar[str] = "rendezvous"

    listen: str = "127.0.0.1:50051"
    # The collector sidecar delivers predictions here; owner-only permissions.
    delivery_socket: Path = Path(tempfile.gettempdir()) / "rendezvous" / "delivery.sock"
    # Requests still awaiting their answer; beyond this, Score is shed with RESOURCE_EXHAUSTED.
    max_in_flight: int = 5_000
    # Answered mailboxes kept open for late predictions; beyond this the oldest closes early
    # (its outcome goes out with the late predictions it has so far).
    max_grace_mailboxes: int = 200_000
    # A client deadline is cut by this much so the answer still reaches the client in time.
    client_deadline_margin_ms: float = 5.0
    request_id_max_length: int = 128
    subject_id_max_length: int = 256
    max_features: int = 1024
    outcome_publish_timeout_s: float = 5.0
