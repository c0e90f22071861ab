"""The one place gRPC client channels are made: plain TCP, TLS or mTLS, from `TlsSettings`.

`aio_channel` (grpc.aio) and `sync_channel` (blocking grpc, the command-line tools) open a
channel to `target` with TLS when `tls.ca_file` is set (the server's certificate must chain
to that CA), presenting `tls.client_cert_file` when an mTLS server asks for one. Without a
CA they are plaintext, the default. A `unix:` target is always a local, plaintext channel:
file permissions protect the socket. `mesh_client_tls` is what the command-line tools use
against the mesh `rendezvous up` runs: TLS when its state file says the mesh uses TLS.

A target may name several replicas of one service (`replicated_target`:
`ipv4:127.0.0.1:50051,127.0.0.1:50061`, what `rendezvous up --rendezvous-replicas 2` prints).
Every channel to such a target balances its calls round robin over the replicas that answer
health with SERVING, and retries a call a replica could not take on another
(`REPLICA_SERVICE_CONFIG`); a client in another language passes the same service config.

Server credentials are built in `services.core.server` (`server_credentials`).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from services.core.settings import TlsSettings
from services.core.tracing import client_interceptors

ChannelOptions = Sequence[tuple[str, Any]]

# The gRPC name resolvers that take a list of literal addresses (C-core's; grpc-go has none).
REPLICA_SCHEMES = ("ipv4", "ipv6")
REPLICA_SEPARATOR = ","

# How a channel to several replicas behaves (gRPC service config):
# - round_robin over the replicas whose health is SERVING (`healthCheckConfig`: the client
#   watches each one's grpc.health.v1 status; a rendezvous is SERVING only once warm and
#   with a collector connected, so a replica restarting or warming up gets no calls until
#   it is ready; a server without the health service counts as healthy);
# - a call that fails with UNAVAILABLE (its replica went away mid-call, or is draining) is
#   retried on another, at most twice, 10-50 ms apart; a call that got an answer is never
#   retried, and the caller's deadline bounds them all;
# - waitForReady off: while any replica is ready a call goes there at once; with none ready
#   it fails fast (UNAVAILABLE) instead of spending its deadline, short for a scoring call,
#   on waiting for a replica that may take seconds to come back.
REPLICA_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [
        {
            "name": [{}],
            "waitForReady": False,
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.01s",
                "maxBackoff": "0.05s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
# A replica that went away is dialled again at most this far apart (gRPC's default grows to
# 120 s): a restarted replica gets its share of calls back within seconds of being ready.
REPLICA_MAX_RECONNECT_BACKOFF_MS = 2000


def replicated_target(addresses: Sequence[str]) -> str:
    """One gRPC target for the replicas at `addresses` (host:port, literal IPs): the address
    itself for one, `ipv4:a,b,...` (`ipv6:` for bracketed IPv6) for several."""
    if not addresses:
        raise ValueError("a target needs at least one address")
    if len(addresses) == 1:
        return addresses[0]
    scheme = "ipv6" if addresses[0].startswith("[") else "ipv4"
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not port.isdigit() or not _is_ip(host.strip("[]"), scheme):
            raise ValueError(
                f"replica address {address!r} must be a literal {scheme} address with a port "
                "(gRPC resolves no names in a list of replicas)"
            )
    return f"{scheme}:{REPLICA_SEPARATOR.join(addresses)}"


def _is_ip(host: str, scheme: str) -> bool:
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        return False
    return parsed.version == (6 if scheme == "ipv6" else 4)


def target_addresses(target: str) -> list[str]:
    """The host:port addresses `target` names: each replica of a replicated target, or the
    target itself."""
    scheme, colon, rest = target.partition(":")
    if colon and scheme in REPLICA_SCHEMES:
        return [address for address in rest.split(REPLICA_SEPARATOR) if address]
    return [target]


def balancing_options(target: str) -> list[tuple[str, Any]]:
    """The channel options a target of several replicas needs (none for one address)."""
    addresses = target_addresses(target)
    if len(addresses) < 2:
        return []
    return [
        ("grpc.service_config", json.dumps(REPLICA_SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.max_reconnect_backoff_ms", REPLICA_MAX_RECONNECT_BACKOFF_MS),
        # The authority (and the name a TLS certificate is checked against) would otherwise
        # be the whole list; every replica's certificate names the same host.
        ("grpc.default_authority", addresses[0]),
    ]


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
    `services.core.client`) on every call; round robin over the replicas of a replicated
    target (`balancing_options`)."""
    credentials = _secure(target, tls)
    chain = [*client_interceptors(), *interceptors]
    options = [*balancing_options(target), *options]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=chain or None)
    return grpc.aio.secure_channel(
        target, credentials, options=list(options), interceptors=chain or None
    )


def sync_channel(
    target: str,
    tls: TlsSettings | None = None,
    options: ChannelOptions = (),
    interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
) -> grpc.Channel:
    """A blocking grpc channel to `target`: TLS per `tls`, plaintext without it; round robin
    over the replicas of a replicated target (`balancing_options`)."""
    credentials = _secure(target, tls)
    options = [*balancing_options(target), *options]
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
