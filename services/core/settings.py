"""Typed settings: one object per service, read from env vars and a YAML file.

Precedence (highest first): constructor arguments, environment variables
(`RDV_<SERVICE>_<FIELD>`, nested fields joined by `__`), the service's section
(`config_section`) of the YAML file named by `RENDEZVOUS_CONFIG`, then the
defaults declared here. A missing file or section reads as empty. Nothing else in
the code base carries tunable constants.
"""

from __future__ import annotations

import os
import socket
import ssl
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_FILE_ENV = "RENDEZVOUS_CONFIG"


# The repository checkout the services run from (where deploy/, tools/ and .run/ are).
REPO_ROOT = Path(__file__).resolve().parents[2]


def _default_instance() -> str:
    # Unique per process so that a restarted instance never reuses a return address.
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


# PulsarSettings field -> its key in a mesh's state file (`PulsarSettings.state_facts`).
STATE_PULSAR_KEYS = {
    "service_url": "pulsar_url",
    "admin_url": "pulsar_admin_url",
    "token_file": "pulsar_token_file",
    "tls_trust_certs_file": "pulsar_tls_trust_certs_file",
}


class PulsarSettings(BaseModel):
    """How a service reaches the broker and how hard it tries.

    A plain model, not a settings source of its own: it is read as part of a service's
    settings (`RDV_<SERVICE>_PULSAR__SERVICE_URL`), never from bare environment variables.
    """

    model_config = ConfigDict(extra="forbid")

    service_url: str = "pulsar://127.0.0.1:6650"
    admin_url: str = "http://127.0.0.1:8080"
    tenant_namespace: str = "public/default"
    # A publish on the request path is also bounded by the caller's budget; this is the
    # ceiling for everything else.
    send_timeout_s: float = 5.0
    # Messages a publisher keeps waiting for the broker's receipt (the client's default);
    # one more fails at once. A held publisher (Bus.publisher's `hold`) sets its own.
    max_pending_messages: int = Field(default=1000, ge=1)
    operation_timeout_s: float = 10.0
    # Publishers batch (see Bus.publisher); false makes every message its own entry.
    batching: bool = True
    # 0: a batch leaves as soon as the client's I/O thread gets to it. A lone message
    # waits for nothing; messages published together share one broker entry.
    batching_max_delay_ms: int = Field(default=0, ge=0)
    receiver_queue_size: int = 1000
    negative_ack_redelivery_delay_ms: int = 1000
    # After this many failed deliveries a message goes to the subscription's dead-letter topic.
    max_redeliveries: int = 5
    io_threads: int = 1
    listener_threads: int = 1
    # Pause after closing the client before the process may exit (see PulsarBus.close).
    close_grace_s: float = 0.1
    # Token authentication (a JWT the broker's AuthenticationProviderToken accepts), for the
    # client and as `Authorization: Bearer` on every admin REST call. `token_file` is read
    # when the client is created and at each admin call; a literal `token` wins over it.
    # Neither is ever logged (SecretStr; `repr` shows only the file's path).
    token: SecretStr | None = None
    token_file: Path | None = None
    # TLS (pulsar+ssl:// and https:// URLs): the CA bundle that signed the broker's
    # certificate (None: the system's), whether to accept any certificate, and whether the
    # certificate must name the host connected to (the client's default is off).
    tls_trust_certs_file: Path | None = None
    tls_allow_insecure: bool = False
    tls_validate_hostname: bool = True

    def auth_token(self) -> str | None:
        """The token to present, or None when authentication is off."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        return None

    def admin_headers(self) -> dict[str, str]:
        """Headers every admin REST call carries (the bearer token when there is one)."""
        token = self.auth_token()
        return {} if token is None else {"Authorization": f"Bearer {token}"}

    def admin_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of admin REST calls over https (None: urllib's default)."""
        if not self.admin_url.startswith("https:"):
            return None
        context = ssl.create_default_context(
            cafile=str(self.tls_trust_certs_file) if self.tls_trust_certs_file else None
        )
        if self.tls_allow_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context.check_hostname = self.tls_validate_hostname
        return context

    def state_facts(self) -> dict[str, str | None]:
        """What a mesh's state file (state.json) records of its broker, for the command-line
        tools that read the topics: the URLs and the files of the token and the CA, never a
        secret (a literal `token` is not recorded)."""
        facts: dict[str, str | None] = {}
        for field, state_key in STATE_PULSAR_KEYS.items():
            value = getattr(self, field)
            facts[state_key] = None if value is None else str(value)
        return facts

    def for_mesh(self, state: Mapping[str, Any]) -> PulsarSettings:
        """These settings pointed at the broker a mesh's state file records (`state_facts`),
        unless they name a broker of their own (`service_url` set: env, YAML or an argument);
        a token or CA file set here wins over the state's."""
        own_broker = "service_url" in self.model_fields_set
        if own_broker or not state.get(STATE_PULSAR_KEYS["service_url"]):
            return self
        update = {
            field: state[state_key]
            for field, state_key in STATE_PULSAR_KEYS.items()
            if state.get(state_key) and field not in self.model_fields_set
        }
        return PulsarSettings.model_validate({**self.model_dump(exclude_unset=True), **update})

    def security_env(self) -> dict[str, str]:
        """The authentication and TLS settings that are set, as the environment variables
        (without the `RDV_<SERVICE>_` prefix) that give another process the same ones."""
        env: dict[str, str] = {}
        if self.token is not None:
            env["PULSAR__TOKEN"] = self.token.get_secret_value()
        if self.token_file is not None:
            env["PULSAR__TOKEN_FILE"] = str(self.token_file)
        if self.tls_trust_certs_file is not None:
            env["PULSAR__TLS_TRUST_CERTS_FILE"] = str(self.tls_trust_certs_file)
        if self.tls_allow_insecure:
            env["PULSAR__TLS_ALLOW_INSECURE"] = "true"
        if not self.tls_validate_hostname:
            env["PULSAR__TLS_VALIDATE_HOSTNAME"] = "false"
        return env


class TlsSettings(BaseModel):
    """TLS on a service's gRPC server and on the channels it opens (plain TCP when unset).

    Read as part of a service's settings (`RDV_<SERVICE>_TLS__CERT_FILE` ...). The server
    side is on when `cert_file` and `key_file` are set; `client_ca_file` then makes it mTLS
    (a client must present a certificate that CA signed). The client side is on when
    `ca_file` (the CA a server's certificate must chain to) is set; `client_cert_file` and
    `client_key_file` are what it presents to an mTLS server. The unix-domain socket
    between a rendezvous and its collector never uses TLS (file permissions protect it).
    """

    model_config = ConfigDict(extra="forbid")

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("tls.client_cert_file and tls.client_key_file go together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file (mTLS) needs tls.cert_file and tls.key_file")
        if self.client_cert_file is not None and self.ca_file is None:
            raise ValueError("tls.client_cert_file needs tls.ca_file (the CA servers chain to)")
        return self

    @property
    def server_enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def client_enabled(self) -> bool:
        return self.ca_file is not None

    def env(self) -> dict[str, str]:
        """The set fields as a service's environment, without its `RDV_<SERVICE>_` prefix."""
        return {
            f"TLS__{name.upper()}": str(value)
            for name, value in self.model_dump().items()
            if value is not None
        }


class PrivacySettings(BaseModel):
    """How a service reaches the keyring (crypto-shredding, docs/privacy.md).

    Read as part of a service's settings (`RDV_<SERVICE>_PRIVACY__KEYRING` ...). Without a
    `keyring` address, records are written readable and nothing can be erased from them
    (`rendezvous up` always runs a keyring). Writers of records about a subject (the
    rendezvous' outcomes, the decoy's archive) and the enricher also need the mesh's
    `pseudonym_key_file`: the subject id is looked up by its HMAC, never sent.
    """

    model_config = ConfigDict(extra="forbid")

    # host:port of KeyringService ("" = sealing off).
    keyring: str = ""
    # The mesh's pseudonym key (HMAC-SHA256 of subject ids): the same file for every process.
    pseudonym_key_file: Path | None = None
    # A bearer token for the keyring when its auth is on (scope privacy:keys), read per call.
    token_file: Path | None = None
    # How long a key fetched is used before it is asked for again: after an erasure, a
    # reader that does not follow the erasure topic may still open the subject's records
    # for this long, and a writer may seal new ones under the erased key (unreadable).
    key_cache_ttl_s: float = Field(default=30.0, gt=0)
    # Keys held at once per process (the least recently used go first).
    max_cached_keys: int = Field(default=100_000, ge=1)
    # One keyring call's deadline.
    call_timeout_s: float = Field(default=2.0, gt=0)
    # How long a writer tries to get a subject's key before writing the record with its
    # subject data withheld (never readable in its place).
    seal_wait_s: float = Field(default=10.0, gt=0)
    # Pause between two tries.
    retry_delay_s: float = Field(default=0.5, gt=0)

    @property
    def enabled(self) -> bool:
        return bool(self.keyring)


# Methods any caller may call when auth is on: health (probes, supervisors) and reflection.
DEFAULT_OPEN_METHODS = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
)
# Methods called without a token over the component's Unix socket only (its file mode,
# owner-only, is the access control): the collector's delivery stream to the rendezvous.
DEFAULT_LOCAL_METHODS = ("/rendezvous.v1.DeliveryService/Deliver",)


class AuthSettings(BaseModel):
    """Bearer-token (JWT) authentication and scope authorization of a service's gRPC calls.

    Off by default (the local demo). On, every call but `open_methods` (and `local_methods`
    over the Unix socket) needs `authorization: Bearer <jwt>` signed by one of the configured
    keys, with this issuer and audience, unexpired; `services.core.auth` decides the scopes.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    # HS256: the shared secret, inline (env) or in a file (`rendezvous up --auth` writes one).
    secret: SecretStr | None = None
    secret_file: Path | None = None
    # RS256 / ES256 (by the key's type): the issuer's public key, PEM.
    public_key_file: Path | None = None
    # Only for minting (`rendezvous token`) with RS256 / ES256: the private key, PEM.
    private_key_file: Path | None = None
    issuer: str = "rendezvous"
    audience: str = "rendezvous"
    # Clock skew tolerated on exp / nbf / iat.
    leeway_s: float = Field(default=30.0, ge=0)
    # HS256 secrets shorter than this are refused (RFC 7518 3.2: at least the hash size).
    min_secret_bytes: int = Field(default=32, ge=32)
    # Lifetime of the token `rendezvous up --auth` mints for the mesh's own keyring calls
    # (minted again at every `up`).
    mesh_token_ttl_s: float = Field(default=30 * 86400.0, gt=0)
    open_methods: list[str] = Field(default_factory=lambda: list(DEFAULT_OPEN_METHODS))
    local_methods: list[str] = Field(default_factory=lambda: list(DEFAULT_LOCAL_METHODS))

    @model_validator(mode="after")
    def _has_a_key(self) -> AuthSettings:
        if self.enabled and not (self.secret or self.secret_file or self.public_key_file):
            raise ValueError(
                "auth is enabled but no key is configured: set auth.secret, "
                "auth.secret_file or auth.public_key_file"
            )
        return self


class ServiceSettings(BaseSettings):
    """What every component shares: identity, endpoints, logging, tracing, metrics."""

    model_config = SettingsConfigDict(extra="forbid", env_nested_delimiter="__")
    # This service's section of the RENDEZVOUS_CONFIG file.
    config_section: ClassVar[str] = "service"

    instance: str = Field(default_factory=_default_instance)
    listen: str = "127.0.0.1:0"
    pulsar: PulsarSettings = Field(default_factory=PulsarSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    mesh_file: Path | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Traces (services/core/tracing.py); each is the default of its standard OTEL_* variable.
    # "otlp" sends to `trace_endpoint` (OTLP over gRPC: Jaeger, an OpenTelemetry collector);
    # "console" prints spans (debugging); "none" records nothing, the ids still travel.
    trace_exporter: Literal["none", "console", "otlp"] = "none"
    trace_endpoint: str = "http://127.0.0.1:4317"
    # The share of new traces kept (parent-based: a continued trace keeps its caller's choice).
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # Prometheus `/metrics` on metrics_host:metrics_port (0: none). Loopback by default; a
    # container or Kubernetes deployment sets 0.0.0.0 so its scraper reaches it.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Period of the event-loop lag probe every process runs (rdv_event_loop_lag_seconds).
    loop_lag_probe_interval_s: float = Field(default=0.1, gt=0)
    # How long a thread may hold the GIL while another waits for it (Python's default 5 ms).
    # The Pulsar and gRPC client threads hand each message to the event loop through the GIL.
    switch_interval_ms: float = Field(default=5.0, gt=0)
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
        return init_settings, env_settings, _config_file_section(settings_cls)


def _config_file_section(settings_cls: type[BaseSettings]) -> PydanticBaseSettingsSource:
    """This service's section of the `RENDEZVOUS_CONFIG` file, read by pydantic-settings.

    One file serves every service, so no variable, no file and a file without this
    service's section all read as empty. A file that cannot be read as a mapping of
    sections is an error naming the file and the section.
    """
    path = os.environ.get(CONFIG_FILE_ENV) or None
    section: str = getattr(settings_cls, "config_section", "service")
    try:
        return YamlConfigSettingsSource(settings_cls, yaml_file=path, yaml_config_section=section)
    except KeyError:
        # pydantic-settings' way of saying the file has no such section.
        return YamlConfigSettingsSource(settings_cls, yaml_file=None)
    except yaml.YAMLError as exc:
        raise ValueError(f"{CONFIG_FILE_ENV}={path} is not valid YAML: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{CONFIG_FILE_ENV}={path}: cannot read section {section!r}; the file must map "
            f"service names to mappings of settings ({exc})"
        ) from exc
