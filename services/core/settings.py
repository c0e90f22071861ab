"""Typed settings: one object per service, read from env vars and a YAML file.

Precedence (highest first): constructor arguments, environment variables
(`RDV_<SERVICE>_<FIELD>`), the service's section of the YAML file named by
`RENDEZVOUS_CONFIG`, then the defaults declared here. Nothing else in the code
base carries tunable constants.
"""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_FILE_ENV = "RENDEZVOUS_CONFIG"

# The YAML keys in model_config are used only when RENDEZVOUS_CONFIG names a file.
warnings.filterwarnings("ignore", message="Config key `yaml", category=UserWarning)


def _default_instance() -> str:
    # Unique per process so that a restarted instance never reuses a return address.
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class PulsarSettings(BaseSettings):
    """How a service reaches the broker and how hard it tries."""

    model_config = SettingsConfigDict(extra="forbid")

    service_url: str = "pulsar://127.0.0.1:6650"
    admin_url: str = "http://127.0.0.1:8080"
    tenant_namespace: str = "public/default"
    # A publish on the request path is also bounded by the caller's budget; this is the
    # ceiling for everything else.
    send_timeout_s: float = 5.0
    operation_timeout_s: float = 10.0
    # The asyncio producer batches by default; latency-critical producers turn it off
    # or keep the delay at a millisecond.
    batching_max_delay_ms: int = 1
    receiver_queue_size: int = 1000
    negative_ack_redelivery_delay_ms: int = 1000
    # After this many failed deliveries a message goes to the subscription's dead-letter topic.
    max_redeliveries: int = 5
    io_threads: int = 1
    listener_threads: int = 1


class ServiceSettings(BaseSettings):
    """What every component shares: identity, endpoints, logging, tracing, metrics."""

    model_config = SettingsConfigDict(
        extra="forbid",
        env_nested_delimiter="__",
        yaml_file_encoding="utf-8",
    )

    instance: str = Field(default_factory=_default_instance)
    listen: str = "127.0.0.1:0"
    pulsar: PulsarSettings = Field(default_factory=PulsarSettings)
    mesh_file: Path | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # "console" prints spans (debugging); "none" keeps tracing in-process only.
    trace_exporter: Literal["none", "console"] = "none"
    metrics_port: int = 0
    shutdown_grace_s: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    # Written by the server once it listens, so supervisors learn a port-0 address.
    ready_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=Path(config_file)))
        return tuple(sources)
