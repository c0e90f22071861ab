#!/usr/bin/env bash
# `make helm-check`: the container images and the Helm chart, checked without a cluster or
# a Docker engine, offline.
#
#   1. hadolint lints deploy/docker/*.Dockerfile;
#   2. for each Kubernetes version in K8S_SCHEMA_VERSIONS, `helm lint --strict` and
#      `helm template` render deploy/helm/rendezvous with its default values and with each
#      ci/*-values.yaml, and kubeconform validates every rendered manifest (-strict: no
#      unknown field, no duplicate key) against that version's schemas and KEDA's CRDs,
#      from the local copies `make setup` made (tools/k8s_schemas.py);
#   3. kubeconform refuses a rendered Deployment and ScaledObject given an unknown field (the
#      schemas are strict), and a release the chart must refuse (bearer-token auth without
#      a key) fails;
#   4. tools/chart_check.py checks the rendered releases against the code: settings names and
#      values, modules, the answer path's QoS and socket, the mesh, the autoscalers.
# Rendered manifests are left in .run/helm-check/ to read.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TOOLS_BIN=${TOOLS_BIN:-$PWD/tools/bin}
HELM=${HELM:-$TOOLS_BIN/helm}
KUBECONFORM=${KUBECONFORM:-$TOOLS_BIN/kubeconform}
HADOLINT=${HADOLINT:-.venv/bin/hadolint}
PYTHON=${PYTHON:-.venv/bin/python}
K8S_SCHEMAS=${K8S_SCHEMAS:-$PWD/.cache/k8s-schemas}
K8S_SCHEMA_VERSIONS=${K8S_SCHEMA_VERSIONS:-1.29.0 1.37.0}
CHART=deploy/helm/rendezvous
OUT=.run/helm-check
RELEASE=rdv
NAMESPACE=rendezvous

log() { printf 'helm-check: %s\n' "$*" >&2; }

rm -rf "$OUT"
mkdir -p "$OUT"

log "hadolint"
"$HADOLINT" deploy/docker/*.Dockerfile

kubeconform() {
    "$KUBECONFORM" -strict -summary -kubernetes-version "$1" \
        -schema-location "$K8S_SCHEMAS/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
        -schema-location "$K8S_SCHEMAS/crds/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json" \
        "${@:2}"
}

values_files=("$CHART"/ci/*-values.yaml)
rendered=()
for version in $K8S_SCHEMA_VERSIONS; do
    [[ -d "$K8S_SCHEMAS/v$version-standalone-strict" ]] || {
        log "no schemas for Kubernetes $version in $K8S_SCHEMAS: run 'make setup'"; exit 1; }
    for values in default "${values_files[@]}"; do
        args=()
        name=default
        if [[ "$values" != default ]]; then
            args=(-f "$values")
            name=$(basename "$values" -values.yaml)
        fi
        log "helm lint + template: $name values, Kubernetes $version"
        "$HELM" lint --strict --quiet --kube-version "$version" "$CHART" "${args[@]}"
        out="$OUT/$name-$version.yaml"
        "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$version" \
            "${args[@]}" > "$out"
        rendered+=("$out")
    done
    log "kubeconform: Kubernetes $version"
    kubeconform "$version" "$OUT"/*-"$version".yaml
done

# The schemas are strict: a field Kubernetes or KEDA does not know is an error, not a pass.
log "kubeconform refuses unknown fields (the schemas are strict)"
for kind in Deployment ScaledObject; do
    probe="$OUT/unknown-field-$kind.yaml"
    "$PYTHON" - "$OUT/default-${K8S_SCHEMA_VERSIONS%% *}.yaml" "$kind" > "$probe" <<'PY'
import sys
import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == sys.argv[2]]
docs[0]["spec"]["notAField"] = True
print(yaml.safe_dump(docs[0]))
PY
    if kubeconform "${K8S_SCHEMA_VERSIONS%% *}" "$probe" > "$probe.out" 2>&1; then
        log "kubeconform accepted a $kind with an unknown field"; cat "$probe.out" >&2; exit 1
    fi
    grep -q "notAField" "$probe.out" || { log "unexpected kubeconform error: $(cat "$probe.out")"; exit 1; }
done

log "a release with bearer-token auth and no key must be refused"
if refusal=$("$HELM" template "$RELEASE" "$CHART" --kube-version "${K8S_SCHEMA_VERSIONS%% *}" \
        --set auth.enabled=true --set auth.hs256Key= --set auth.publicKeyKey= 2>&1); then
    log "helm template rendered a release with auth on and no key"; exit 1
fi
grep -q "auth.enabled needs auth.hs256Key or auth.publicKeyKey" <<<"$refusal" \
    || { log "unexpected refusal: $refusal"; exit 1; }

log "chart-check"
"$PYTHON" -m tools.chart_check "${rendered[@]}"
log "ok"
