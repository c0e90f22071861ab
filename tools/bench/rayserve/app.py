"""S4's Serve application, and the script that deploys it onto a running Ray head.

    .venv-peers/bin/python -m tools.bench.rayserve.app   # RDV_RAYSERVE_* say where

One deployment per model of the objective (its `kind` and `args` from the mesh file; the
decoy has no model to run and no counterpart here) and the router, bound to a
DeploymentHandle of each. Serve's gRPC ingress serves `rendezvous.v1.ScoringService`
(Serve calls the router's `Score`), its HTTP ingress the router's counters.

Why the gRPC ingress: the client, the request and the response are then those of S2 (ghz,
`ScoringService/Score`, the same protobuf), so the two differ only in what serves them;
over HTTP S4 would pay JSON encoding that S2 does not, and need another load generator.

Runs only in `.venv-peers` (it imports Ray).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from services.core.mesh import load_mesh
from tools.bench.rayserve.race import ModelReplica, Router
from tools.bench.rayserve.settings import RayServeSettings

SERVICER = "rendezvous.v1.scoring_pb2_grpc.add_ScoringServiceServicer_to_server"


def build(settings: RayServeSettings) -> Any:
    """The application: the router bound to one deployment per model."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    logging_config = LoggingConfig(
        log_level=settings.log_level, enable_access_log=settings.access_log
    )
    entry = load_mesh(settings.mesh_file).objectives[settings.objective]
    models: dict[str, Any] = {}
    for model in entry.models:
        if model.kind is None or not model.enabled:
            continue  # the decoy: S4 keeps no archive (the report says so)
        deployment = serve.deployment(
            ModelReplica,
            name=model.name,
            ray_actor_options={"num_cpus": settings.replica_num_cpus},
            max_ongoing_requests=settings.model_max_ongoing_requests,
            logging_config=logging_config,
        )
        models[model.name] = deployment.bind(model.name, model.kind, model.version, model.args)
    router = serve.deployment(
        Router,
        name="router",
        ray_actor_options={"num_cpus": settings.replica_num_cpus},
        max_ongoing_requests=settings.router_max_ongoing_requests,
        logging_config=logging_config,
    )
    return router.bind(models, str(settings.mesh_file), settings.objective)


def deploy(settings: RayServeSettings) -> None:
    """Connect to the head, start Serve with both ingresses on loopback, run the app (this
    returns once every replica is up; the app outlives this script)."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    ray.init(address=settings.address, logging_level=logging.WARNING, log_to_driver=False)
    grpc_port = settings.proxy_grpc_port or settings.grpc_port
    http_port = settings.proxy_http_port or settings.http_port
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=http_port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER]),
    )
    serve.run(build(settings), name=settings.app_name, route_prefix="/", blocking=False)
    ray.shutdown()


def main() -> int:
    deploy(RayServeSettings())
    print("deployed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
