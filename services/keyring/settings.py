"""Settings of the keyring (env prefix `RDV_KEYRING_`, YAML section `keyring`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class KeyringSettings(ServiceSettings):
    """Where the keyring listens and keeps its keys.

    The pseudonym key it erases by is the mesh's (`privacy.pseudonym_key_file`, the same
    file every writer and the enricher read).
    """

    model_config = SettingsConfigDict(env_prefix="RDV_KEYRING_")
    config_section: ClassVar[str] = "keyring"

    listen: str = "127.0.0.1:50054"
    # The SQLite file of keys and erasures (0600; its directory 0700). Required: keys kept
    # in a default place nobody backs up would make every sealed record unreadable at once.
    database: Path
    # The key that wraps every stored data key (AES-256-GCM, hex, 0600): a copy of the
    # database alone opens nothing.
    master_key_file: Path
    # Longest subject id Erase takes (the rendezvous' own limit on ScoreRequest.subject_id).
    subject_id_max_length: int = Field(default=256, ge=1)
    objective_max_length: int = Field(default=256, ge=1)
    reason_max_length: int = Field(default=512, ge=0)
    # Key ids one GetKeys call may ask for.
    max_key_ids: int = Field(default=10_000, ge=1)
    # Publishing an erasure on the erasure topic: each attempt's deadline, and the pause
    # before an erasure not yet announced is tried again.
    publish_timeout_s: float = Field(default=5.0, gt=0)
    retry_delay_s: float = Field(default=1.0, gt=0)
    # Admin REST calls that make the erasure topic keep everything (like the control topic).
    admin_timeout_s: float = Field(default=5.0, gt=0)
    admin_attempts: int = Field(default=5, ge=1)
