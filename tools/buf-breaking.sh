#!/usr/bin/env bash
# Fail when protos/ breaks the contract as it stands on the main branch (`buf breaking`).
#
# Compares the working tree with `.git#branch=main` when that branch exists and holds the
# protos (so the very first commit, with nothing to compare with, is skipped with a note).
# In a clone that has no local main (CI checking out a feature branch), origin/main is
# used instead. Rules: `breaking:` in buf.yaml.
#
# One transition is allowed: against a tree whose protos set no `go_package` at all (no Go
# code was generated from it, so none can break), setting it is not reported
# (FILE_SAME_GO_PACKAGE is skipped for that comparison only). Once the compared tree has
# go_package, any change of it fails as usual.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUF=.venv/bin/buf
BRANCH="${BUF_BREAKING_BRANCH:-main}"

log() { printf 'buf-breaking: %s\n' "$*" >&2; }

[[ -x "${BUF}" ]] || {
    log "missing ${BUF}; run 'make venv'"
    exit 1
}

if ! git rev-parse --git-dir >/dev/null 2>&1; then
    log "not a git checkout; nothing to compare with, skipped"
    exit 0
fi

# The tree to compare with must hold the module (protos/) and its buf.yaml, or buf would
# read it as a different module and report every file as moved.
has_contract() {
    git cat-file -e "$1:protos" 2>/dev/null && git cat-file -e "$1:buf.yaml" 2>/dev/null
}

# buf's configuration for the comparison with tree $1: buf.yaml, plus the go_package
# transition above when $1 sets no go_package.
config_against() {
    if git grep -q 'option go_package' "$1" -- protos; then
        cat buf.yaml
        return
    fi
    log "$1 sets no go_package yet: adding it is allowed (FILE_SAME_GO_PACKAGE skipped)"
    .venv/bin/python - <<'PY'
import json

import yaml

with open("buf.yaml", encoding="utf-8") as handle:
    config = yaml.safe_load(handle)
breaking = config.setdefault("breaking", {})
breaking["except"] = [*breaking.get("except", []), "FILE_SAME_GO_PACKAGE"]
print(json.dumps(config))
PY
}

if git show-ref --verify --quiet "refs/heads/${BRANCH}"; then
    if ! has_contract "refs/heads/${BRANCH}"; then
        log "branch ${BRANCH} has no protos/ and buf.yaml yet (first commit?); skipped"
        exit 0
    fi
    log "comparing protos/ with branch ${BRANCH} ($(git rev-parse --short "refs/heads/${BRANCH}"))"
    exec "${BUF}" breaking --against ".git#branch=${BRANCH}" \
        --config "$(config_against "refs/heads/${BRANCH}")"
fi

remote_ref="refs/remotes/origin/${BRANCH}"
if git show-ref --verify --quiet "${remote_ref}"; then
    if ! has_contract "${remote_ref}"; then
        log "origin/${BRANCH} has no protos/ and buf.yaml yet; skipped"
        exit 0
    fi
    # buf clones local branches only; export that tree instead.
    against="$(mktemp -d)"
    trap 'rm -rf "${against}"' EXIT
    git archive "${remote_ref}" protos buf.yaml | tar -x -C "${against}"
    log "comparing protos/ with origin/${BRANCH} ($(git rev-parse --short "${remote_ref}"))"
    "${BUF}" breaking --against "${against}" --config "$(config_against "${remote_ref}")"
    exit 0
fi

log "no branch ${BRANCH} (nor origin/${BRANCH}) to compare with; skipped"
