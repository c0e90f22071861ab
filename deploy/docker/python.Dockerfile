# syntax=docker/dockerfile:1
# The Python image: every Python component of the mesh, one image, chosen by the command
# (`python -m services.<name>`: rendezvous, collector, runner, models, enricher, decoy,
# control, evaluator) and the `rendezvous` CLI (objective changes, reports, tokens).
#
#   docker build -f deploy/docker/python.Dockerfile -t rendezvous:0.1.0 .
#
# Build context: the repository root (.dockerignore keeps virtualenvs, node_modules and run
# state out). Base images are pinned by the digest of their multi-platform index, as
# docker-library/repo-info recorded it: python:3.11-slim-bookworm (Python 3.11.16, Aug 2026)
# and golang:1.26-bookworm (Go 1.26.5, Jul 2026). Bump tag and digest together.
#
# No HEALTHCHECK: Kubernetes ignores it (the chart's probes ask each server's
# grpc.health.v1 service), and one image runs eight servers, each on its own port.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b
ARG GOLANG_IMAGE=golang:1.26-bookworm@sha256:551752d3ad9de9923190bf5280500617ed8fee287ffb4b0220e770ef89346258

# grpc-health-probe: kubelet's own gRPC probe speaks no TLS, so a mesh on (m)TLS probes
# with this static binary instead (the chart's exec probes, `grpcTls.enabled`); the Go and
# Node images carry the same one at the same path.
FROM ${GOLANG_IMAGE} AS healthprobe
ARG GRPC_HEALTH_PROBE_VERSION=v0.4.62
RUN CGO_ENABLED=0 GOBIN=/out go install -trimpath -ldflags="-s -w" \
        github.com/grpc-ecosystem/grpc-health-probe@${GRPC_HEALTH_PROBE_VERSION}

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/rendezvous
WORKDIR /src
# The dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && /opt/rendezvous/bin/pip install --no-compile -r /tmp/requirements.txt
# Then the code: the services and the generated protos (gen/: rendezvous.v1, inference.v2),
# installed as a wheel with their data files (model artifacts, the report page).
COPY gen/rendezvous gen/rendezvous
COPY gen/inference gen/inference
COPY services services
RUN /opt/rendezvous/bin/pip install --no-deps . \
 && /opt/rendezvous/bin/python -m compileall -q /opt/rendezvous/lib

FROM ${PYTHON_IMAGE}
# A fixed, unprivileged uid: the rendezvous and its collector share the delivery socket's
# 0700 directory, so both containers of that pod must run as this same user.
RUN groupadd --system --gid 10001 rendezvous \
 && useradd --system --uid 10001 --gid rendezvous --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin rendezvous
COPY --from=build /opt/rendezvous /opt/rendezvous
COPY --from=healthprobe /out/grpc-health-probe /usr/local/bin/grpc-health-probe
ENV PATH=/opt/rendezvous/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051
CMD ["python", "-m", "services.rendezvous"]
