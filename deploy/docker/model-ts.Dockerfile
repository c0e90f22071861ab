# syntax=docker/dockerfile:1
# The TypeScript model container (services/models/ts) on Node: rendezvous.v1.ModelService,
# health and reflection on RDV_MODEL_LISTEN, serving the committed diabetes artifacts.
#
#   docker build -f deploy/docker/model-ts.Dockerfile -t rendezvous-model-ts:0.1.0 .
#
# Build context: the repository root. The base is pinned by its index digest
# (node:22-bookworm-slim, Node 22.23.2, Sep 2026, docker-library/repo-info): Node 22 is the
# supported LTS line (the local mesh and its tests run the same code on Node >= 20).
#
# No HEALTHCHECK: Kubernetes ignores it and probes grpc.health.v1 itself (kubelet's gRPC
# probe, or grpc-health-probe on a TLS mesh: kubelet's speaks no TLS).

ARG NODE_IMAGE=node:22-bookworm-slim@sha256:48e4b67d85f87bd551df43704e24d252f56cc5f8e9718841aace50f19948f0f9
ARG GOLANG_IMAGE=golang:1.26-bookworm@sha256:551752d3ad9de9923190bf5280500617ed8fee287ffb4b0220e770ef89346258

# grpc-health-probe, a static binary, for the chart's probes on a TLS mesh.
FROM ${GOLANG_IMAGE} AS healthprobe
ARG GRPC_HEALTH_PROBE_VERSION=v0.4.62
RUN CGO_ENABLED=0 GOBIN=/out go install -trimpath -ldflags="-s -w" \
        github.com/grpc-ecosystem/grpc-health-probe@${GRPC_HEALTH_PROBE_VERSION}

FROM ${NODE_IMAGE} AS build
# The repository's layout: services/models/ts/gen links to ../../../gen/ts, and the compiled
# code finds the artifacts at services/models/artifacts.
WORKDIR /src/services/models/ts
COPY services/models/ts/package.json services/models/ts/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY gen/ts /src/gen/ts
COPY services/models/ts ./
RUN npm run build \
 && rm -rf dist/test \
 && npm prune --omit=dev --no-audit --no-fund --loglevel=error

FROM ${NODE_IMAGE}
ENV NODE_ENV=production \
    RDV_MODEL_LISTEN=0.0.0.0:50051
WORKDIR /app/services/models/ts
COPY services/models/artifacts/diabetes-linear.json services/models/artifacts/diabetes-ridge.json /app/services/models/artifacts/
COPY --from=build /src/services/models/ts/package.json ./
COPY --from=build /src/services/models/ts/node_modules ./node_modules
COPY --from=build /src/services/models/ts/dist ./dist
COPY --from=healthprobe /out/grpc-health-probe /usr/local/bin/grpc-health-probe
# The base image's unprivileged `node` user, by number (runAsNonRoot can check a number).
USER 1000:1000
EXPOSE 50051
# node itself, not npm or the image's entrypoint script: SIGTERM reaches the server.
ENTRYPOINT ["node", "dist/main.js"]
