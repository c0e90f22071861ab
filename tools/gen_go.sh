#!/usr/bin/env bash
# Go for protos/ into DIR/rendezvous/v1 (package rendezvousv1, import path
# github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1 when DIR is gen/go): messages
# (protoc-gen-go) and gRPC stubs (protoc-gen-go-grpc), both pinned and installed into
# tools/bin by `make setup`.
#
#   tools/gen_go.sh DIR
#
# With PROTOC_GEN_GO_VERSION / PROTOC_GEN_GO_GRPC_VERSION set (make exports the pins), a
# plugin of another version is an error: the generated files name the version that made
# them, so two versions would never agree on `make gen-check`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd)
bin=${TOOLS_BIN:-$repo/tools/bin}

check_plugin() {  # NAME PINNED-VERSION
    local plugin=$bin/$1 have
    [[ -x $plugin ]] || { echo "gen_go: missing $plugin; run 'make setup'" >&2; exit 1; }
    have=$("$plugin" --version | awk '{print $NF}')
    if [[ -n $2 && ${have#v} != "${2#v}" ]]; then
        echo "gen_go: $plugin is $have, the pin is $2; run 'make setup'" >&2
        exit 1
    fi
}
check_plugin protoc-gen-go "${PROTOC_GEN_GO_VERSION:-}"
check_plugin protoc-gen-go-grpc "${PROTOC_GEN_GO_GRPC_VERSION:-}"

rm -rf "$out/rendezvous"
"$repo/tools/protoc.sh" \
  --plugin=protoc-gen-go="$bin/protoc-gen-go" --plugin=protoc-gen-go-grpc="$bin/protoc-gen-go-grpc" \
  --go_out="$out" --go_opt=paths=source_relative \
  --go-grpc_out="$out" --go-grpc_opt=paths=source_relative
