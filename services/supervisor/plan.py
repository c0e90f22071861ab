"""Turns a mesh file into the processes that serve it, in start order.

Every process gets a fixed loopback port chosen once (so a restarted model
container comes back where its runner looks for it), a ready file, and its
settings as `RDV_<SERVICE>_*` environment variables: the same settings objects
the services read in production, nothing supervisor-specific.
"""

from __future__ import annotations

import json
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path

from services.core.mesh import Mesh

# Start order: a stage starts once every process of the stage before is ready. The
# rendezvous and its collector start together: the rendezvous serves only once a
# collector stream is open and its warm-up through the whole path is done.
STAGE_MODELS = 0
STAGE_CONSUMERS = 1
STAGE_RENDEZVOUS = 2
STAGE_COLLECTOR = STAGE_RENDEZVOUS

RENDEZVOUS_INSTANCE = "rdv-0"


@dataclass
class ProcessSpec:
    """One supervised process."""

    name: str
    module: str
    stage: int
    env: dict[str, str]
    endpoint: str
    ready_file: Path
    log_file: Path
    # Health is checked on this service name ("" = the whole server).
    health_service: str = ""
    role: str = ""
    # On the answer path: scheduled ahead of the models and the broker (see SupervisorSettings).
    latency_critical: bool = False
    labels: dict[str, str] = field(default_factory=dict)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Below the kernel's ephemeral range: a port chosen now and bound by a child a moment later
# cannot meanwhile be taken as the source port of some outgoing connection.
PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port that is free now and not in the ephemeral range."""
    low, high = PORT_RANGE
    ephemeral_low, ephemeral_high = _ephemeral_range()
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, high)
        if port in _handed_out or ephemeral_low <= port <= ephemeral_high:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


def plan(
    mesh: Mesh,
    mesh_file: Path,
    state_dir: Path,
    pulsar_url: str,
    pulsar_admin_url: str,
) -> list[ProcessSpec]:
    """Every process of the mesh, models first, the collector last."""
    specs: list[ProcessSpec] = []
    socket_path = state_dir / RENDEZVOUS_INSTANCE / "delivery.sock"

    def add(  # noqa: PLR0917 (a local builder; keywords would only add noise)
        name: str,
        module: str,
        prefix: str,
        stage: int,
        settings: dict[str, str],
        listen: str | None = None,
        role: str = "",
        latency_critical: bool = False,
    ) -> ProcessSpec:
        endpoint = listen or f"127.0.0.1:{free_port()}"
        ready_file = state_dir / "ready" / f"{name}.json"
        env = {
            f"{prefix}LISTEN": endpoint,
            f"{prefix}READY_FILE": str(ready_file),
            f"{prefix}PULSAR__SERVICE_URL": pulsar_url,
            f"{prefix}PULSAR__ADMIN_URL": pulsar_admin_url,
            f"{prefix}METRICS_PORT": str(free_port()),
            **{f"{prefix}{key}": value for key, value in settings.items()},
        }
        spec = ProcessSpec(
            name=name,
            module=module,
            stage=stage,
            env=env,
            endpoint=endpoint,
            ready_file=ready_file,
            log_file=state_dir / "logs" / f"{name}.log",
            role=role,
            latency_critical=latency_critical,
            labels={"metrics": f"127.0.0.1:{env[f'{prefix}METRICS_PORT']}"},
        )
        specs.append(spec)
        return spec

    for objective, entry in mesh.objectives.items():
        # Deployments that scale together (the same replica count) share runner hosts:
        # host r of a group receives each task once for all of the group's models, and the
        # decoy joins the group of its replica count as the host's archive.
        groups: dict[int, list[dict[str, str]]] = {}
        archived: set[int] = set()
        for model in entry.models:
            if model.role == "decoy":
                archived.add(model.replicas)
                groups.setdefault(model.replicas, [])
                continue
            endpoint = model.endpoint
            if endpoint is None:
                if model.kind is None:
                    raise ValueError(f"model {model.name!r} needs a kind or an endpoint")
                container = add(
                    f"model-{model.name}",
                    "services.models",
                    "RDV_MODEL_",
                    STAGE_MODELS,
                    {
                        "KIND": model.kind,
                        "NAME": model.name,
                        "VERSION": model.version,
                        "ARGS": json.dumps(model.args),
                    },
                    role=model.role,
                )
                endpoint = container.endpoint
            groups.setdefault(model.replicas, []).append(
                {
                    "objective": objective,
                    "model": model.name,
                    "role": model.role,
                    "model_version": model.version,
                    "endpoint": endpoint,
                }
            )
        for replicas, deployments in sorted(groups.items()):
            # One group keeps the plain names (the usual case: every model scales alike).
            group = "" if len(groups) == 1 else f"x{replicas}-"
            for replica in range(replicas):
                add(
                    f"runners-{objective}-{group}{replica}",
                    "services.runner",
                    "RDV_RUNNER_",
                    STAGE_CONSUMERS,
                    {
                        "OBJECTIVE": objective,
                        "DEPLOYMENTS": json.dumps(deployments),
                        "SUBSCRIPTION": f"runners-{group}".rstrip("-"),
                        "ARCHIVE": str(replicas in archived).lower(),
                        "DEFAULT_ARCHIVING": entry.default_consent.archiving,
                    },
                    role="runner+decoy" if replicas in archived else "runner",
                )
    if any(entry.enriched for entry in mesh.objectives.values()):
        add(
            "enricher",
            "services.enricher",
            "RDV_ENRICHER_",
            STAGE_CONSUMERS,
            {"MESH_FILE": str(mesh_file)},
        )
    add(
        "rendezvous",
        "services.rendezvous",
        "RDV_RENDEZVOUS_",
        STAGE_RENDEZVOUS,
        {
            "MESH_FILE": str(mesh_file),
            "INSTANCE": RENDEZVOUS_INSTANCE,
            "DELIVERY_SOCKET": str(socket_path),
        },
        listen=mesh.rendezvous.listen,
        latency_critical=True,
    )
    add(
        "collector",
        "services.collector",
        "RDV_COLLECTOR_",
        STAGE_COLLECTOR,
        {"INSTANCE": RENDEZVOUS_INSTANCE, "DELIVERY_SOCKET": str(socket_path)},
        latency_critical=True,
    )
    return specs
