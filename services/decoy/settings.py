"""Settings of the decoy (env prefix `RDV_DECOY_`, YAML section `decoy`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class DecoySettings(ServiceSettings):
    """Which objective the decoy archives and how hard it works."""

    model_config = SettingsConfigDict(env_prefix="RDV_DECOY_")
    config_section: ClassVar[str] = "decoy"

    # Required: a decoy archiving the wrong objective by default would be a silent audit gap.
    objective: str = Field(min_length=1)
    # The SHARED subscription on the tasks topic: decoy replicas split the archiving.
    subscription: str = "decoy"
    # What an unspecified archiving consent means when the mesh file does not say
    # (the objective's `default_consent.archiving` in `mesh_file` wins when present).
    default_archiving: Literal["granted", "denied"] = "granted"
    # Tasks being archived at once.
    max_in_flight: int = Field(default=256, ge=1)
    # Tasks archived that are remembered (their mailbox ids, the latest first): one that
    # comes again is acknowledged without a second record (0: none). At 100 req/s, 20 000
    # cover 200 s, far more than the acknowledgements a killed broker forgets (~1-10 s).
    remember_archived: int = Field(default=20_000, ge=0)
    # Pause before a failed receive is tried again.
    retry_delay_s: float = Field(default=1.0, gt=0)
