"""The one place gRPC client channels are made: plain TCP, TLS or mTLS, from `TlsSettings`.

`aio_channel` (grpc.aio) and `sync_channel` (blocking grpc, the command-line tools) open a
channel to `target` with TLS when `tls.ca_file` is set (the server's certificate must chain
to that CA), presenting `tls.client_cert_file` when an mTLS server asks for one. Without a
CA they are plaintext, the default. A `unix:` target is always a local, plaintext channel:
file permissions protect the socket. `mesh_client_tls` is what the command-line tools use
against the mesh `rendezvous up` runs: TLS when its state file says the mesh uses TLS.

Server credentials are built in `services.core.server` (`server_credentials`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from services.core.settings import TlsSettings
from services.core.tracing import client_interceptors

ChannelOptions = Sequence[tuple[str, Any]]

# The key of state.json (written by the supervisor) that holds the client side of the mesh's TLS.
STATE_TLS_KEY = "tls"


def read_pem(path: Path | None, what: str) -> bytes | None:
    """The bytes of a PEM file named by a TLS setting; a clear error when it cannot be read."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the TLS {what} {path}: {error.strerror}") from error


def client_credentials(tls: TlsSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials for outgoing channels, or None when TLS is off for clients."""
    if not tls.client_enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls.ca_file, "CA certificate (tls.ca_file)"),
        private_key=read_pem(tls.client_key_file, "client key (tls.client_key_file)"),
        certificate_chain=read_pem(
            tls.client_cert_file, "client certificate (tls.client_cert_file)"
        ),
    )


def _secure(target: str, tls: TlsSettings | None) -> grpc.ChannelCredentials | None:
    if tls is None or target.startswith("unix:"):
        return None
    return client_credentials(tls)


def aio_channel(
    target: str,
    tls: TlsSettings | None = None,
    options: ChannelOptions = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`: TLS per `tls`, plaintext without it; a CLIENT span per
    call (`services.core.tracing`) and `interceptors` (e.g. the bearer token of
    `services.core.client`) on every call."""
    credentials = _secure(target, tls)
    chain = [*client_interceptors(), *interceptors]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=chain)
    return grpc.aio.secure_channel(target, credentials, options=list(options), interceptors=chain)


def sync_channel(
    target: str,
    tls: TlsSettings | None = None,
    options: ChannelOptions = (),
    interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
) -> grpc.Channel:
    """A blocking grpc channel to `target`: TLS per `tls`, plaintext without it."""
    credentials = _secure(target, tls)
    if credentials is None:
        opened = grpc.insecure_channel(target, options=list(options))
    else:
        opened = grpc.secure_channel(target, credentials, options=list(options))
    return grpc.intercept_channel(opened, *interceptors) if interceptors else opened


def state_client_tls(state: Mapping[str, Any]) -> TlsSettings:
    """The client side of the TLS a mesh's state (state.json) records; plaintext if none."""
    return TlsSettings.model_validate(state.get(STATE_TLS_KEY) or {})


def mesh_client_tls(state_dir: Path) -> TlsSettings:
    """The client TLS of the mesh `rendezvous up` runs under `state_dir` (plaintext if none)."""
    try:
        state: dict[str, Any] = json.loads((state_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return TlsSettings()
    return state_client_tls(state)
