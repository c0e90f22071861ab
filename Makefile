# Rendezvous — every developer and CI task starts here.
# `make up` brings the whole mesh up from nothing; `make test` runs every check.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON_BASE ?= python3
VENV := .venv
# MLServer (an Open Inference Protocol server) in a virtualenv of its own: its pins are not ours.
MLSERVER_VENV := .venv-mlserver
# Ray Serve, the benchmark's S4, likewise (tools/peers-requirements.txt); not part of `setup`.
PEERS_VENV := .venv-peers
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TOOLS_BIN := $(CURDIR)/tools/bin
GHZ_VERSION := v0.120.0
GRPCURL_VERSION := v1.9.4
# The Helm chart's checks (make helm-check): helm and kubeconform built from their Go
# modules like ghz; the Kubernetes schemas of these releases (the kubernetes-validate
# package) and KEDA's CRDs (its Go module) made into kubeconform's offline layout.
HELM_VERSION := v3.22.0
KUBECONFORM_VERSION := v0.8.0
KEDA_VERSION := v2.21.0
export K8S_SCHEMA_VERSIONS := 1.29.0 1.37.0
export K8S_SCHEMAS := $(CURDIR)/.cache/k8s-schemas
empty :=
space := $(empty) $(empty)
K8S_SCHEMA_STAMP := $(K8S_SCHEMAS)/.made-keda-$(KEDA_VERSION)-k8s-$(subst $(space),_,$(K8S_SCHEMA_VERSIONS))
# Go code generators (tools/gen_go.sh refuses any other version: their output names them).
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
export PYTHON := $(CURDIR)/$(PY)
export TOOLS_BIN PROTOC_GEN_GO_VERSION PROTOC_GEN_GO_GRPC_VERSION
# The Go model container (tools/bin, beside the other built tools; rebuilt by every
# `make setup`, go build's cache makes that cheap). ModelDeployment.command names it.
MODEL_GO := $(TOOLS_BIN)/rendezvous-model-go
# The TypeScript generator (tools/tsgen: ts-proto) and the Node model container, each
# installed from its lockfile by `npm ci`.
NPM_CI := npm ci --no-audit --no-fund --loglevel=error
TSGEN := tools/tsgen/node_modules/.installed
MODEL_TS := services/models/ts
# Go sources that gofmt checks (gen/go is generated formatted, and checked all the same).
GO_DIRS := services/models/go services/models/artifacts gen/go examples/goclient

.PHONY: help setup setup-peers venv mlserver tools jaeger go-plugins model-go browser gen gen-check lint lint-go fmt buf-breaking \
        helm-tools k8s-schemas helm-check \
        unit integration test test-go ts test-ts check \
        pulsar-up pulsar-down up up-tls down status demo report demo-promote score ghz-smoke bench bench-smoke chaos profile clean

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON_BASE) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

venv: $(VENV)/.installed

$(MLSERVER_VENV)/.installed: tools/mlserver-requirements.txt
	rm -rf $(MLSERVER_VENV)
	$(PYTHON_BASE) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install --quiet --upgrade pip
	$(MLSERVER_VENV)/bin/pip install --quiet -r tools/mlserver-requirements.txt
	touch $@

mlserver: $(MLSERVER_VENV)/.installed ## MLServer + its scikit-learn runtime in .venv-mlserver (the oip tests)

$(PEERS_VENV)/.installed: tools/peers-requirements.txt pyproject.toml
	rm -rf $(PEERS_VENV)
	$(PYTHON_BASE) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -e . -r tools/peers-requirements.txt
	touch $@

setup-peers: $(PEERS_VENV)/.installed ## Ray Serve (the bench's S4) in .venv-peers, with this project's code (~0.7 GB, ~2.5 min)

$(TOOLS_BIN)/ghz:
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

$(TOOLS_BIN)/grpcurl:
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

# Jaeger, the trace store of `rendezvous up --traces`. Its module has replace directives, so
# `go install ...@version` refuses it: tools/jaeger/go.mod pins it (a tool directive, go.sum
# checking every module) and it is built from there. A first build is long: measured 92 min
# wall on this 2-core machine shared at load average 25-40, of which 10.4 min user and 2 min
# system CPU (so several minutes on an idle machine), plus 1.5 min of module downloads; go's
# build cache makes later builds quick, and a changed go.mod rebuilds.
$(TOOLS_BIN)/jaeger: tools/jaeger/go.mod tools/jaeger/go.sum
	mkdir -p $(TOOLS_BIN)
	cd tools/jaeger && go build -o $(TOOLS_BIN)/jaeger github.com/jaegertracing/jaeger/cmd/jaeger

jaeger: $(TOOLS_BIN)/jaeger ## Build Jaeger (pinned in tools/jaeger/go.mod) into tools/bin

tools: $(TOOLS_BIN)/ghz $(TOOLS_BIN)/grpcurl $(TOOLS_BIN)/jaeger

# A stamp per pinned version, so a bump reinstalls (helm's first build takes minutes).
$(TOOLS_BIN)/.helm-$(HELM_VERSION):
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
	touch $@

$(TOOLS_BIN)/.kubeconform-$(KUBECONFORM_VERSION):
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) go install github.com/yannh/kubeconform/cmd/kubeconform@$(KUBECONFORM_VERSION)
	touch $@

helm-tools: $(TOOLS_BIN)/.helm-$(HELM_VERSION) $(TOOLS_BIN)/.kubeconform-$(KUBECONFORM_VERSION) ## helm and kubeconform, pinned, into tools/bin

$(K8S_SCHEMA_STAMP): $(VENV)/.installed tools/k8s_schemas.py
	rm -rf $(K8S_SCHEMAS)
	$(PY) -m tools.k8s_schemas --out $(K8S_SCHEMAS) --keda-version $(KEDA_VERSION) \
	  $(foreach version,$(K8S_SCHEMA_VERSIONS),--kubernetes-version $(version))
	touch $@

k8s-schemas: $(K8S_SCHEMA_STAMP) ## Offline JSON schemas for kubeconform: Kubernetes (kubernetes-validate) and KEDA's CRDs

helm-check: venv helm-tools k8s-schemas ## hadolint the Dockerfiles; helm lint, helm template and kubeconform -strict the chart; check it against the code
	tools/helm-check.sh

# A stamp per pinned version, so a bump reinstalls.
$(TOOLS_BIN)/.protoc-gen-go-$(PROTOC_GEN_GO_VERSION):
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	touch $@

$(TOOLS_BIN)/.protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION):
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	touch $@

go-plugins: $(TOOLS_BIN)/.protoc-gen-go-$(PROTOC_GEN_GO_VERSION) $(TOOLS_BIN)/.protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION) ## protoc-gen-go and protoc-gen-go-grpc, pinned, into tools/bin

model-go: ## Build the Go model container into tools/bin/rendezvous-model-go
	mkdir -p $(TOOLS_BIN)
	go build -o $(MODEL_GO) ./services/models/go

browser: venv ## Headless Chromium for the report page's browser tests (RDV_CHROMIUM overrides)
	tools/browser.sh

setup: venv mlserver tools go-plugins model-go ts browser helm-tools k8s-schemas ## Install everything: virtualenvs (ours, MLServer's), buf, ghz, grpcurl, Jaeger, Go plugins and container, the TS generator and container, Chromium, helm, kubeconform and their schemas, Apache Pulsar
	tools/pulsar.sh fetch

gen: venv go-plugins $(TSGEN) ## Regenerate gen/ from protos/ (Python, Go, and TypeScript once tools/gen_ts.sh exists)
	tools/gen.sh

gen-check: venv go-plugins $(TSGEN) ## Fail if gen/ differs, in any language, from what protos/ generate
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	tools/gen.sh "$$tmp"; \
	stale=0; \
	for dir in rendezvous inference go ts; do \
	  [[ -e "$$tmp/$$dir" || -e "gen/$$dir" ]] || continue; \
	  diff -r --exclude=__pycache__ --exclude=node_modules "$$tmp/$$dir" "gen/$$dir" || stale=1; \
	done; \
	(( stale == 0 )) || { echo "gen/ is stale: run 'make gen' and commit the result" >&2; exit 1; }

lint: venv ## ruff, mypy (strict), buf lint, buf format, buf breaking, gofmt and go vet
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/buf format -d --exit-code
	tools/buf-breaking.sh
	$(MAKE) --no-print-directory lint-go

lint-go: ## gofmt (no file to reformat), go vet, and go.mod/go.sum tidy
	@unformatted=$$(gofmt -l $(GO_DIRS)); \
	[[ -z "$$unformatted" ]] || { echo "gofmt would reformat:" $$unformatted >&2; exit 1; }
	go vet ./...
	go mod tidy -diff

fmt: venv ## Format Python, Go and protos in place
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/buf format -w
	gofmt -w $(GO_DIRS)

unit: venv ## Unit tests only (no broker)
	$(BIN)/pytest -m 'not integration'

# Stamps live in node_modules, which `npm ci` recreates, so a changed lockfile reinstalls.
$(TSGEN): tools/tsgen/package-lock.json
	cd tools/tsgen && $(NPM_CI)
	touch $@

$(MODEL_TS)/node_modules/.installed: $(MODEL_TS)/package-lock.json
	cd $(MODEL_TS) && $(NPM_CI)
	touch $@

ts: $(TSGEN) $(MODEL_TS)/node_modules/.installed ## Install the TS generator and build the Node model container (tsc)
	cd $(MODEL_TS) && npm run --silent build

test-ts: venv ts ## The Node model container's tests (node --test, real loopback gRPC; TLS with tools/certs.py's certificates)
	cd $(MODEL_TS) && npm test

test-go: ## Go tests: go test ./... (the Go model container against the Python model)
	go test -count=1 ./...

test: setup setup-peers lint gen-check helm-check test-go test-ts ## Every check: lint, gen drift, the images and the Helm chart, Go and TS tests, ghz and bench smoke (S4 included), unit and integration tests on a real broker
	tools/ghz-smoke.sh
	$(PY) -m tools.bench --smoke
	tools/run-tests.sh

check: test ## Alias of test

pulsar-up: ## Start the Apache Pulsar standalone broker on 127.0.0.1
	tools/pulsar.sh up

pulsar-down: ## Stop the broker
	tools/pulsar.sh down

ghz-smoke: setup ## Start a model container and call it through reflection with ghz
	tools/ghz-smoke.sh

up: setup ## Bring the whole mesh up (broker included) and print the endpoint (TLS=1: mTLS everywhere; TRACES=1: Jaeger; RENDEZVOUS_REPLICAS=N: N rendezvous)
	$(BIN)/rendezvous up $(if $(TLS),--tls) $(if $(TRACES),--traces) $(if $(RENDEZVOUS_REPLICAS),--rendezvous-replicas $(RENDEZVOUS_REPLICAS))

up-tls: ## Bring the mesh up with mTLS on every gRPC server and client (certificates in .run/certs)
	$(MAKE) up TLS=1

down: ## Stop the mesh and the broker it started
	$(BIN)/rendezvous down

status: ## Show what the mesh is running
	$(BIN)/rendezvous status

score: ## Send one request to the running mesh and print the answer
	$(BIN)/rendezvous score

demo: ## Score a few hundred diabetes rows, record their real targets as feedback, print the evaluation
	$(BIN)/rendezvous demo

report: ## The evaluation report of the demo objective: terminal summary + rendezvous-report-demo.html
	$(BIN)/rendezvous report --objective demo

demo-promote: ## Under 100 req/s: add a challenger, promote it, roll back; switch times and checks
	$(BIN)/rendezvous demo-promote --out docs/results/lifecycle/latest.json

bench: setup setup-peers ## Benchmark S0-S4 side by side (S4: Ray Serve); writes docs/results/bench/ (BENCH_ARGS="--smoke": the CI check)
	$(PY) -m tools.bench $(BENCH_ARGS)

bench-smoke: setup setup-peers ## Every system (S4 included) once at 20 req/s: are the figures complete and sane (part of make test)
	$(PY) -m tools.bench --smoke

chaos: setup ## The fault matrix: kill -9 each component and the broker under 100 req/s, then a 10 min soak; writes docs/results/reliability.md (CHAOS_ARGS="--soak 0")
	$(PY) -m tools.chaos $(CHAOS_ARGS)

profile: setup ## py-spy on every process of S2 under load (PROFILE_ARGS="--system S1 --rate 500")
	$(PY) -m tools.bench.profile $(PROFILE_ARGS)

clean: ## Remove the virtualenv, caches and run state (keeps the Pulsar download in ~/.m2)
	-tools/pulsar.sh down
	rm -rf $(VENV) $(MLSERVER_VENV) $(PEERS_VENV) .run .mypy_cache .ruff_cache .pytest_cache $(K8S_SCHEMAS)
	rm -rf tools/tsgen/node_modules $(MODEL_TS)/node_modules $(MODEL_TS)/dist
