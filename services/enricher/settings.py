"""Settings of the model data enricher (env prefix `RDV_ENRICHER_`, YAML section `enricher`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class EnricherSettings(ServiceSettings):
    """What the enricher follows, how much state it keeps and how hard it works."""

    model_config = SettingsConfigDict(env_prefix="RDV_ENRICHER_")
    config_section: ClassVar[str] = "enricher"

    # Objectives whose requests this enricher serves; empty means every objective of mesh_file.
    objectives: list[str] = Field(default_factory=list)
    # Follow the control topic instead: serve every objective whose enrichment is not NONE,
    # live (how the supervisor runs it).
    follow: bool = False
    # When following: serve only these objectives of the control topic (empty: every one).
    # The local supervisor passes its mesh's, so a broker shared with other meshes (tests,
    # a second mesh) adds no work here.
    serve_only: list[str] = Field(default_factory=list)
    # The SHARED subscription on each request topic: enricher replicas split the load.
    subscription: str = "enricher"
    # LRU bound over (objective, subject) pairs; the least recently used subject is forgotten.
    max_subjects: int = Field(default=100_000, ge=1)
    # Events kept per subject (the newest by event time); counts go on beyond it.
    max_events_per_subject: int = Field(default=20, ge=1)
    # Distinct kinds counted per subject; further kinds are counted under OTHER_KIND.
    max_kinds_per_subject: int = Field(default=32, ge=1)
    # Tasks being enriched and published at once, per request topic.
    max_in_flight: int = Field(default=256, ge=1)
    # Tasks published that are remembered (their mailbox ids, the latest first), per request
    # topic: a request that comes again is acknowledged without publishing its task twice
    # (0: none). At 100 req/s, 20 000 cover 200 s, far more than the acknowledgements a
    # killed broker forgets (~1-10 s).
    remember_published: int = Field(default=20_000, ge=0)
    # Pause before a failed events reader or request subscription tries again.
    retry_delay_s: float = Field(default=1.0, gt=0)
