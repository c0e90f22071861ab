#!/usr/bin/env bash
# Python for protos/ into DIR/rendezvous (messages, gRPC stubs and their mypy stubs):
# grpcio-tools + mypy-protobuf from the project venv.
#
#   tools/gen_python.sh DIR
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
# protoc finds protoc-gen-mypy / protoc-gen-mypy_grpc on PATH.
export PATH="$(dirname "$py"):$PATH"

rm -rf "$out/rendezvous"
"$repo/tools/protoc.sh" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out"
# Package markers so `rendezvous.v1` is a regular package (mypy and setuptools agree).
: > "$out/rendezvous/__init__.py"
: > "$out/rendezvous/v1/__init__.py"
printf 'partial\n' > "$out/rendezvous/py.typed"
