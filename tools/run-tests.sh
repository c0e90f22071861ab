#!/usr/bin/env bash
# Run the whole pytest suite (unit, contract, integration) against a real Apache Pulsar.
#
#   tools/run-tests.sh [pytest args...]
#
# Starts a fresh standalone broker (tools/pulsar.sh up), runs .venv/bin/pytest with the
# given arguments, and stops the broker on the way out whatever happened (tests failing,
# Ctrl-C, `up` failing half-way). Exits with pytest's exit code; "no tests collected"
# (pytest's 5) is a failure too, never a silent pass.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'run-tests: %s\n' "$*" >&2; }

# Set before `up`, so that a broker that started but never became healthy is stopped too.
trap 'tools/pulsar.sh down' EXIT
# Turn signals into an ordinary exit so that the EXIT trap runs.
trap 'exit 130' INT
trap 'exit 143' TERM

tools/pulsar.sh up

status=0
.venv/bin/pytest "$@" || status=$?

case "${status}" in
    0) log "all tests passed" ;;
    5) log "pytest collected no tests: that is a failure" ;;
    *) log "pytest failed with exit code ${status}" ;;
esac
exit "${status}"
