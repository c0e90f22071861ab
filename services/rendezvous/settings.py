"""Settings of the rendezvous service."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

from pydantic import Field
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
    # Outcomes the broker has not confirmed (an outage) wait, in the Pulsar client, up to
    # this many and this many bytes; beyond either an outcome is dropped (counted and
    # logged). Each waiting outcome also costs ~3 KiB of Python objects besides its bytes.
    # 20 000: over 3 minutes of outage at 100 req/s (see services/rendezvous/outcomes.py).
    outcome_backlog_max: int = Field(default=20_000, ge=1)
    outcome_backlog_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # A publish the client failed all the same is tried again after this pause, doubled
    # after each failure up to the max.
    outcome_retry_initial_s: float = Field(default=0.1, gt=0)
    outcome_retry_max_s: float = Field(default=5.0, gt=0)
    # The event-loop lag probe's period (the rdv_event_loop_lag_seconds metric, and how
    # far a request's clock is started before its handler ran).
    loop_lag_probe_interval_s: float = Field(default=0.02, gt=0)
    # How long after a stall its lateness is still charged to requests (its backlog).
    loop_lag_backlog_window_s: float = Field(default=0.005, ge=0)
    # A request the loop could leave less than this much of its SLA is shed at once with
    # RESOURCE_EXHAUSTED: answering it would only answer late.
    min_race_budget_ms: float = Field(default=5.0, ge=0)
    # Following the control topic (when not given static configurations): how long start-up
    # waits for the topic to hold an objective (the control component seeds it first), and
    # the pause before reading the topic, or opening a new objective's publishers, again.
    # Serve only these objectives of the control topic (empty: every one). The local
    # supervisor passes its mesh's: a broker shared with other meshes (tests, a second mesh)
    # holds objectives no runner of this mesh serves, and warming those up would only wait.
    serve_only: list[str] = Field(default_factory=list)
    control_wait_s: float = Field(default=60.0, gt=0)
    control_retry_delay_s: float = Field(default=0.5, gt=0)
    # Warm-up before SERVING (see services/rendezvous/warmup.py).
    warmup: bool = True
    warmup_rate: float = Field(default=50.0, gt=0)
    # Restarted while other replicas serve (the local supervisor sets it on such a restart):
    # the broker, runners and models are warm already and busy with the others' answers;
    # warm-up traffic at warmup_rate would add as much work for them as a busy client (on a
    # 2-core machine, 50 req/s of warm-up beside 40 req/s of clients). It warms up at
    # rejoin_warmup_rate instead, taking longer to rejoin rather than slowing the others.
    rejoining: bool = False
    rejoin_warmup_rate: float = Field(default=10.0, gt=0)
    warmup_consecutive: int = Field(default=150, ge=1)
    warmup_consecutive_per_objective: int = Field(default=10, ge=1)
    warmup_within_fraction: float = Field(default=0.5, gt=0, le=1)
    warmup_min_s: float = Field(default=0.0, ge=0)
    warmup_max_s: float = Field(default=90.0, gt=0)
