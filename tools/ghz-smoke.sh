#!/usr/bin/env bash
# Load-smoke a real grpc.aio server of the project with ghz, through server reflection.
#
# Starts the `sum` example model container (`python -m services.models`, port 0, ready file),
# checks one answer by hand, sends GHZ_REQUESTS calls to rendezvous.v1.ModelService/Predict
# with tools/bin/ghz (no .proto files: ghz discovers the service by reflection), prints the
# summary, fails if any call did not end OK, and stops the server whatever happens.
#
# Environment (optional): GHZ_REQUESTS (300), GHZ_CONCURRENCY (10), GHZ_CONNECTIONS (2),
# GHZ_START_TIMEOUT seconds to wait for the server (30).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

GHZ=tools/bin/ghz
PYTHON=.venv/bin/python
REQUESTS="${GHZ_REQUESTS:-300}"
CONCURRENCY="${GHZ_CONCURRENCY:-10}"
CONNECTIONS="${GHZ_CONNECTIONS:-2}"
START_TIMEOUT="${GHZ_START_TIMEOUT:-30}"
CALL=rendezvous.v1.ModelService/Predict
STOP_GRACE_S=10

log() { printf 'ghz-smoke: %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

[[ -x "${GHZ}" ]] || die "missing ${GHZ}; run 'make tools'"
[[ -x "${PYTHON}" ]] || die "missing ${PYTHON}; run 'make venv'"

work="$(mktemp -d)"
server_pid=""

stop_server() {
    [[ -n "${server_pid}" ]] || return 0
    if kill -0 "${server_pid}" 2>/dev/null; then
        kill -TERM "${server_pid}" 2>/dev/null || true
        local waited=0
        while kill -0 "${server_pid}" 2>/dev/null && ((waited < STOP_GRACE_S * 10)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "${server_pid}" 2>/dev/null; then
            log "server ${server_pid} ignored SIGTERM for ${STOP_GRACE_S}s; SIGKILL"
            kill -KILL "${server_pid}" 2>/dev/null || true
        fi
    fi
    wait "${server_pid}" 2>/dev/null || true
    server_pid=""
}

cleanup() {
    stop_server
    rm -rf "${work}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

RDV_MODEL_KIND=sum RDV_MODEL_NAME=sum RDV_MODEL_LISTEN=127.0.0.1:0 \
    RDV_MODEL_READY_FILE="${work}/ready.json" RDV_MODEL_LOG_LEVEL=WARNING \
    "${PYTHON}" -m services.models </dev/null >"${work}/server.log" 2>&1 &
server_pid=$!

deadline=$((SECONDS + START_TIMEOUT))
until [[ -s "${work}/ready.json" ]]; do
    if ! kill -0 "${server_pid}" 2>/dev/null; then
        cat "${work}/server.log" >&2
        server_pid=""
        die "the model container exited before it was ready"
    fi
    if ((SECONDS >= deadline)); then
        cat "${work}/server.log" >&2
        die "the model container wrote no ready file within ${START_TIMEOUT}s"
    fi
    sleep 0.1
done
endpoint="$("${PYTHON}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["endpoint"])' \
    "${work}/ready.json")"
log "sum model serving on ${endpoint} (pid ${server_pid})"

# One call checked by hand: the load test below only counts statuses, not answers.
"${PYTHON}" - "${endpoint}" <<'PY'
import sys

import grpc
from rendezvous.v1 import model_pb2, model_pb2_grpc

from services.core.protos import set_values

with grpc.insecure_channel(sys.argv[1]) as channel:
    request = model_pb2.PredictRequest(request_id="ghz-check", objective="demo")
    set_values(request.features, {"x": 1.5, "y": 2, "z": -0.5})
    response = model_pb2_grpc.ModelServiceStub(channel).Predict(request, timeout=5)
if response.score != 3.0:
    sys.exit(f"ghz-smoke: sum model answered {response.score}, expected 3.0")
PY

"${GHZ}" --insecure --call "${CALL}" \
    --data '{"request_id": "ghz-{{.RequestNumber}}", "objective": "demo",
             "features": {"x": 1.5, "y": 2, "z": -0.5}}' \
    --total "${REQUESTS}" --concurrency "${CONCURRENCY}" --connections "${CONNECTIONS}" \
    --timeout 5s --format json --output "${work}/report.json" "${endpoint}"

"${PYTHON}" - "${work}/report.json" "${REQUESTS}" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
expected = int(sys.argv[2])
ms = 1e6  # ghz reports nanoseconds
statuses = report.get("statusCodeDistribution") or {}
errors = report.get("errorDistribution") or {}
quantiles = {
    entry["percentage"]: entry["latency"] / ms for entry in report.get("latencyDistribution") or []
}
print(f"ghz {report['options']['call']} on {report['options']['host']}")
print(
    f"  requests {report['count']} in {report['total'] / 1e9:.2f} s = {report['rps']:.0f} req/s"
    f" (concurrency {report['options']['concurrency']})"
)
print(
    f"  latency ms: fastest {report['fastest'] / ms:.2f}  average {report['average'] / ms:.2f}"
    f"  slowest {report['slowest'] / ms:.2f}"
    + "".join(f"  p{p} {quantiles[p]:.2f}" for p in (50, 90, 99) if p in quantiles)
)
print(f"  status codes: {statuses}")
if errors:
    print(f"  errors: {errors}")
if errors or report["count"] != expected or statuses != {"OK": expected}:
    sys.exit(f"ghz-smoke: FAILED: expected {expected} OK responses")
print("ghz-smoke: all requests OK")
PY
