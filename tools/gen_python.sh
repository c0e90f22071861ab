#!/usr/bin/env bash
# Python for protos/ into DIR/rendezvous (messages, gRPC stubs and their mypy stubs):
# grpcio-tools + mypy-protobuf from the project venv. Also DIR/inference: the third-party
# contract we speak (protos/third_party/inference/v2, the Open Inference Protocol), generated
# from protos/third_party so that its Python package is `inference.v2`.
#
#   tools/gen_python.sh DIR
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
# protoc finds protoc-gen-mypy / protoc-gen-mypy_grpc on PATH.
export PATH="$(dirname "$py"):$PATH"

rm -rf "$out/rendezvous" "$out/inference"
"$repo/tools/protoc.sh" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out"
# Package markers so `rendezvous.v1` is a regular package (mypy and setuptools agree).
: > "$out/rendezvous/__init__.py"
: > "$out/rendezvous/v1/__init__.py"
printf 'partial\n' > "$out/rendezvous/py.typed"

wkt=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
(cd "$repo/protos/third_party" && "$py" -m grpc_tools.protoc -I . -I "$wkt" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  inference/v2/*.proto)
: > "$out/inference/__init__.py"
: > "$out/inference/v2/__init__.py"
printf 'partial\n' > "$out/inference/py.typed"
