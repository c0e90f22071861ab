"""Turns a mesh file into the processes that serve it, in start order.

Every process gets a fixed loopback port chosen once (so a restarted model
container comes back where its runner looks for it), a ready file, and its
settings as `RDV_<SERVICE>_*` environment variables: the same settings objects
the services read in production, nothing supervisor-specific.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

from services.core.mesh import Mesh

# Start order: a stage starts once every process of the stage before is ready.
STAGE_MODELS = 0
STAGE_CONSUMERS = 1
STAGE_RENDEZVOUS = 2
STAGE_COLLECTOR = 3

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
    labels: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


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
            labels={"metrics": f"127.0.0.1:{env[f'{prefix}METRICS_PORT']}"},
        )
        specs.append(spec)
        return spec

    for objective, entry in mesh.objectives.items():
        for model in entry.models:
            if model.role == "decoy":
                add(
                    f"decoy-{objective}",
                    "services.decoy",
                    "RDV_DECOY_",
                    STAGE_CONSUMERS,
                    {"OBJECTIVE": objective},
                    role="decoy",
                )
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
            for replica in range(model.replicas):
                add(
                    f"runner-{model.name}-{replica}",
                    "services.runner",
                    "RDV_RUNNER_",
                    STAGE_CONSUMERS,
                    {
                        "OBJECTIVE": objective,
                        "MODEL": model.name,
                        "ROLE": model.role,
                        "MODEL_VERSION": model.version,
                        "ENDPOINT": endpoint,
                    },
                    role=model.role,
                )
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
    )
    add(
        "collector",
        "services.collector",
        "RDV_COLLECTOR_",
        STAGE_COLLECTOR,
        {"INSTANCE": RENDEZVOUS_INSTANCE, "DELIVERY_SOCKET": str(socket_path)},
    )
    return specs
