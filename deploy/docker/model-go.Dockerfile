# syntax=docker/dockerfile:1
# The Go model container (services/models/go): rendezvous.v1.ModelService, health and
# reflection on RDV_MODEL_LISTEN, the diabetes artifacts embedded at build time.
#
#   docker build -f deploy/docker/model-go.Dockerfile -t rendezvous-model-go:0.1.0 .
#
# Build context: the repository root (the Go module is the repository). The builder is
# pinned by its index digest (golang:1.26-bookworm, Go 1.26.5, docker-library/repo-info);
# the result is one static binary on an empty image: nothing else to patch.
#
# No HEALTHCHECK: Kubernetes ignores it and probes grpc.health.v1 itself (kubelet's gRPC
# probe, or grpc-health-probe on a TLS mesh: kubelet's speaks no TLS).

ARG GOLANG_IMAGE=golang:1.26-bookworm@sha256:551752d3ad9de9923190bf5280500617ed8fee287ffb4b0220e770ef89346258
ARG GRPC_HEALTH_PROBE_VERSION=v0.4.62

FROM ${GOLANG_IMAGE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY gen/go gen/go
COPY services/models/artifacts services/models/artifacts
COPY services/models/go services/models/go
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/rendezvous-model-go ./services/models/go
ARG GRPC_HEALTH_PROBE_VERSION
RUN CGO_ENABLED=0 GOBIN=/out go install -trimpath -ldflags="-s -w" \
        github.com/grpc-ecosystem/grpc-health-probe@${GRPC_HEALTH_PROBE_VERSION}

FROM scratch
COPY --from=build /out/rendezvous-model-go /rendezvous-model-go
COPY --from=build /out/grpc-health-probe /usr/local/bin/grpc-health-probe
# A container listens on every interface; the chart sets the same.
ENV RDV_MODEL_LISTEN=0.0.0.0:50051
USER 65532:65532
EXPOSE 50051
ENTRYPOINT ["/rendezvous-model-go"]
