"""Settings of S4, the Ray Serve peer (env prefix RDV_RAYSERVE_).

The bench (`tools.bench.rayserve.cluster`) sets them on `ray start`, whose processes (the
Serve controller, proxy and replicas) inherit them, and on the script that deploys the
application.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parents[3]


class RayServeSettings(BaseSettings):
    """Which objective S4 races, where its ingress listens, how its deployments are sized."""

    model_config = SettingsConfigDict(env_prefix="RDV_RAYSERVE_", extra="forbid")

    # The objective's models, policy, SLA and default: the same file and objective as S2.
    mesh_file: Path = REPO / "deploy" / "mesh" / "bench-systems.yaml"
    objective: str = Field(default="bench-race", min_length=1)
    # The Ray head's GCS address (host:port), set by the bench.
    address: str = "127.0.0.1:6379"
    app_name: str = Field(default="s4", min_length=1)
    # Serve's gRPC ingress (our ScoringService) and its HTTP ingress (the router's counters).
    grpc_port: int = Field(default=9000, ge=1, le=65535)
    http_port: int = Field(default=8000, ge=1, le=65535)
    # `ray start --num-cpus 2` declares the machine's two cores; Serve reserves one CPU per
    # replica unless told otherwise, so five replicas (router + four models) take 0.4 each.
    replica_num_cpus: float = Field(default=0.4, ge=0)
    # Serve's default is 5 requests in flight per replica; the router holds each request
    # for up to the SLA (50 ms), so 833 req/s keeps ~40 in flight. Both are asyncio code
    # that waits, so they take many at once, as Ray's performance guide advises.
    router_max_ongoing_requests: int = Field(default=256, ge=1)
    model_max_ongoing_requests: int = Field(default=256, ge=1)
    # Serve logs every request to a file by default; S2 logs none (structured logs only on
    # warnings). Off, as Ray's guide advises for throughput.
    access_log: bool = False
    # Ray Serve's own high-throughput mode (Ray >= 2.56, RAY_SERVE_THROUGHPUT_OPTIMIZED=1, as
    # Ray's guide to high throughput sets it): gRPC between deployments instead of actor
    # calls, user code on the replica's own event loop, buffered request logs, and direct
    # ingress: the router's replica serves the gRPC and HTTP ports itself, with no proxy.
    throughput_optimized: bool = True
    # Serve still starts its proxy in that mode: it must not take the router's ports, so
    # the bench gives it two others (None: the proxy serves grpc_port and http_port).
    proxy_grpc_port: int | None = Field(default=None, ge=1, le=65535)
    proxy_http_port: int | None = Field(default=None, ge=1, le=65535)
    log_level: str = "WARNING"
