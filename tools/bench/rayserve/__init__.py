"""S4: Ray Serve running the same race as S2, for the side-by-side benchmark.

The four models of `deploy/mesh/bench-systems.yaml`'s `bench-race` objective (the same model
classes and artifacts the S2 containers serve) are Ray Serve deployments; a router
deployment fans each request out to all of them through DeploymentHandles, waits with
`asyncio.wait` for the first prediction the objective's policy accepts and answers the
objective's default at the SLA. Ray Serve's gRPC ingress serves our `ScoringService`, so ghz
drives S4 exactly as it drives S2.

- `race`: the deployments' code (the router's race and the model replica), free of Ray so
  it is unit-tested without it;
- `app`: the Serve application and the script that deploys it (runs in `.venv-peers`);
- `cluster`: the bench's side (our `.venv`): starts a Ray head of its own on loopback,
  deploys, measures, stops it;
- `settings`: what both sides read (RDV_RAYSERVE_*).

Ray and Ray Serve live in their own virtualenv, `.venv-peers` (`make setup-peers`): ~0.7 GB
that neither `make up` nor the mesh needs.
"""
