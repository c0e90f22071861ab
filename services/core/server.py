"""Server lifecycle shared by every component.

`GrpcServer` wraps a grpc.aio server with the parts every component has: the
tracing interceptor (a span per call, `services.core.tracing`), the per-RPC metrics
(`services.core.rpc_metrics`) and error interceptors, the standard health service (which
drains to NOT_SERVING before stop) and server reflection (what ghz, grpcurl and Kubernetes
probes expect), and the auth interceptor (`services.core.auth`) when the service's auth
settings enable it. The component lifecycle that owns it is `services.core.lifecycle`.

Its TCP port is plaintext, TLS or mTLS per `TlsSettings` (`server_credentials`); its
unix-domain socket is always local and plaintext (file permissions protect it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.core.channels import read_pem
from services.core.errors import ErrorInterceptor
from services.core.rpc_metrics import RpcMetricsInterceptor
from services.core.settings import AuthSettings, TlsSettings
from services.core.tracing import server_interceptors as tracing_interceptors

log = logging.getLogger(__name__)


class _ReflectionPool:
    """The default descriptor pool, also resolving method names (`pkg.Service.Method`).

    ghz asks server reflection for the file containing the *method*; protobuf's Python
    pool only resolves messages, enums, services and extensions (grpc/grpc#34743,
    bojand/ghz#419), so ghz failed with "Symbol not found" against every component.
    """

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()

    def FindFileContainingSymbol(self, name: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(name)
        except KeyError:
            service_name, _, method = name.rpartition(".")
            if not service_name:
                raise
            service = self._pool.FindServiceByName(service_name)
            if method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


Registrar = Callable[[grpc.aio.Server], None]


def server_credentials(tls: TlsSettings | None) -> grpc.ServerCredentials | None:
    """TLS credentials for a server's TCP port (mTLS with `client_ca_file`), or None."""
    if tls is None or not tls.server_enabled:
        return None
    key = read_pem(tls.key_file, "server key (tls.key_file)")
    cert = read_pem(tls.cert_file, "server certificate (tls.cert_file)")
    assert key is not None and cert is not None  # both set: TlsSettings checks the pair
    client_ca = read_pem(tls.client_ca_file, "client CA (tls.client_ca_file)")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def server_interceptors(auth: AuthSettings | None) -> list[grpc.aio.ServerInterceptor]:
    """Every server's interceptors, outermost first.

    Observability comes first, so it sees each call as the client does (the status after
    the error mapping, the whole time spent): tracing outermost (the caller's trace is
    current for everything inside), then the per-RPC metrics; the error interceptor next;
    the auth interceptor inside it, which maps its refusals.
    """
    interceptors: list[grpc.aio.ServerInterceptor] = [
        *tracing_interceptors(),
        RpcMetricsInterceptor(),
        ErrorInterceptor(),
    ]
    if auth is not None and auth.enabled:
        from services.core.auth import AuthInterceptor

        interceptors.append(AuthInterceptor(auth))
    return interceptors


class GrpcServer:
    """A grpc.aio server with health, reflection and error mapping built in."""

    def __init__(
        self,
        *,
        service_names: Sequence[str],
        registrars: Sequence[Registrar],
        tcp_address: str | None,
        uds_path: Path | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        maximum_concurrent_rpcs: int | None = None,
        extra_options: Iterable[tuple[str, Any]] = (),
        tls: TlsSettings | None = None,
        auth: AuthSettings | None = None,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            *extra_options,
        ]
        self._server = grpc.aio.server(
            interceptors=server_interceptors(auth),
            options=options,
            maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for register in registrars:
            register(self._server)
        self._service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME],
            self._server,
            pool=_ReflectionPool(),
        )
        self._stopped = False
        self.tcp_port: int | None = None
        self.tcp_address = tcp_address
        if tcp_address is not None:
            credentials = server_credentials(tls)
            self.tcp_port = (
                self._server.add_insecure_port(tcp_address)
                if credentials is None
                else self._server.add_secure_port(tcp_address, credentials)
            )
        self.uds_path = uds_path
        if uds_path is not None:
            private_socket_dir(uds_path.parent)
            with contextlib.suppress(FileNotFoundError):
                uds_path.unlink()
            # The socket is created under the server's umask: owner-only access.
            old_umask = os.umask(0o177)
            try:
                self._server.add_insecure_port(f"unix://{uds_path}")
            finally:
                os.umask(old_umask)

    @property
    def endpoint(self) -> str:
        if self.tcp_address is None or self.tcp_port is None:
            return ""
        host = self.tcp_address.rsplit(":", 1)[0]
        return f"{host}:{self.tcp_port}"

    async def start(self) -> None:
        await self._server.start()
        if self.uds_path is not None:
            # The umask already applies; chmod makes the intent explicit and survives odd umasks.
            os.chmod(self.uds_path, 0o600)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set("", status)
        for name in self._service_names:
            await self._health.set(name, status)

    async def stop(self, grace: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)


def private_socket_dir(directory: Path) -> None:
    """Make `directory` this user's alone (0700), creating it if needed.

    `mkdir(mode=0o700)` only applies to a directory it creates: one left behind with wider
    permissions (an older run, another umask) is tightened here. A directory another user
    owns is refused: whoever owns it could swap the socket for their own.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = directory.stat().st_uid
    if owner != os.geteuid():
        raise PermissionError(
            f"socket directory {directory} belongs to uid {owner}, not to this process"
        )
    os.chmod(directory, 0o700)


def write_ready_file(path: Path | None, **facts: Any) -> None:
    """Tell a supervisor where this process listens, atomically."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **facts}))
    tmp.replace(path)
