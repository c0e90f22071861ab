#!/usr/bin/env bash
# Regenerates the code for protos/ in every language into a directory (default gen/):
#
#   DIR/rendezvous/   Python      tools/gen_python.sh
#   DIR/inference/    Python      tools/gen_python.sh (protos/third_party: Open Inference Protocol)
#   DIR/go/           Go          tools/gen_go.sh
#   DIR/ts/           TypeScript  tools/gen_ts.sh, once it exists
#
# One generator path for all: every language's script runs the same pinned protoc
# (tools/protoc.sh: grpcio-tools from the project venv) with that language's pinned
# plugins, so the committed output is reproducible; `make gen-check` runs this into a
# temporary directory and diffs every language.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/gen}
mkdir -p "$out"

"$repo/tools/gen_python.sh" "$out"
"$repo/tools/gen_go.sh" "$out/go"
if [[ -x $repo/tools/gen_ts.sh ]]; then
    "$repo/tools/gen_ts.sh" "$out/ts"
fi
