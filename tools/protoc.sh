#!/usr/bin/env bash
# The one protoc every language's generator runs: grpcio-tools' bundled protoc from the
# project venv (pinned in pyproject.toml), with protos/ and the well-known types on the
# include path, over every file of protos/rendezvous/v1, run from protos/ so output paths
# are `rendezvous/v1/...`.
#
#   tools/protoc.sh --python_out=DIR ...
#
# Plugins come from PATH or from --plugin=protoc-gen-NAME=PATH (see tools/gen_*.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
wkt=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
cd "$repo/protos"
exec "$py" -m grpc_tools.protoc -I . -I "$wkt" "$@" rendezvous/v1/*.proto
