#!/usr/bin/env bash
# Regenerates the Python code for protos/ into a directory (default gen/).
# One pinned generator (grpcio-tools + mypy-protobuf from the project venv) so the
# committed output is reproducible; `make gen-check` runs this into a temp dir and diffs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/gen}
py=${PYTHON:-$repo/.venv/bin/python}
venv_bin=$(dirname "$py")
# protoc finds protoc-gen-mypy / protoc-gen-mypy_grpc on PATH.
export PATH="$venv_bin:$PATH"
wkt=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')

rm -rf "$out/rendezvous"
mkdir -p "$out"
cd "$repo/protos"
"$py" -m grpc_tools.protoc -I . -I "$wkt" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  rendezvous/v1/*.proto
# Package markers so `rendezvous.v1` is a regular package (mypy and setuptools agree).
: > "$out/rendezvous/__init__.py"
: > "$out/rendezvous/v1/__init__.py"
printf 'partial\n' > "$out/rendezvous/py.typed"
# TypeScript (gen/ts) from the same protos, when its generator is there (tools/gen_ts.sh).
if [[ -x $repo/tools/gen_ts.sh ]]; then "$repo/tools/gen_ts.sh" "$out"; fi
