# Rendezvous — every developer and CI task starts here.
# `make up` brings the whole mesh up from nothing; `make test` runs every check.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON_BASE ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TOOLS_BIN := $(CURDIR)/tools/bin
GHZ_VERSION := v0.120.0
GRPCURL_VERSION := v1.9.4
export PYTHON := $(CURDIR)/$(PY)
NPM_CI := npm ci --no-audit --no-fund --loglevel=error
TSGEN := tools/tsgen/node_modules/.installed
MODEL_TS := services/models/ts

.PHONY: help setup venv tools browser gen gen-check lint fmt buf-breaking unit integration test check \
        pulsar-up pulsar-down up down status demo report demo-promote score ghz-smoke bench bench-smoke profile clean \
        ts test-ts

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON_BASE) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

venv: $(VENV)/.installed

$(TOOLS_BIN)/ghz:
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

$(TOOLS_BIN)/grpcurl:
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

tools: $(TOOLS_BIN)/ghz $(TOOLS_BIN)/grpcurl

browser: venv ## Headless Chromium for the report page's browser tests (RDV_CHROMIUM overrides)
	tools/browser.sh

setup: venv tools browser ts ## Install everything: virtualenv, buf, ghz, grpcurl, Chromium, Apache Pulsar, the TS model
	tools/pulsar.sh fetch

gen: venv $(TSGEN) ## Regenerate gen/ from protos/
	tools/gen.sh

gen-check: venv $(TSGEN) ## Fail if gen/ differs from what protos/ generate
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	tools/gen.sh "$$tmp"; \
	diff -r --exclude=__pycache__ "$$tmp/rendezvous" gen/rendezvous \
	  || { echo "gen/ is stale: run 'make gen' and commit the result" >&2; exit 1; }; \
	diff -r "$$tmp/ts" gen/ts \
	  || { echo "gen/ts is stale: run 'make gen' and commit the result" >&2; exit 1; }

# TypeScript: the pinned protoc plugin (tools/tsgen) and the Node model container
# (services/models/ts), each installed from its lockfile; stamps live in node_modules,
# which `npm ci` recreates, so a changed lockfile reinstalls.
$(TSGEN): tools/tsgen/package-lock.json
	cd tools/tsgen && $(NPM_CI)
	touch $@

$(MODEL_TS)/node_modules/.installed: $(MODEL_TS)/package-lock.json
	cd $(MODEL_TS) && $(NPM_CI)
	touch $@

ts: $(TSGEN) $(MODEL_TS)/node_modules/.installed ## Install the TS generator and build the Node model container (tsc)
	cd $(MODEL_TS) && npm run --silent build

test-ts: ts ## The Node model container's tests (node --test, real loopback gRPC)
	cd $(MODEL_TS) && npm test

lint: venv ## ruff, mypy (strict), buf lint and buf format
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/buf format -d --exit-code
	tools/buf-breaking.sh

fmt: venv ## Format Python and protos in place
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/buf format -w

unit: venv ## Unit tests only (no broker)
	$(BIN)/pytest -m 'not integration'

test: setup lint gen-check test-ts ## Every check: lint, gen drift, ghz and bench smoke, unit and integration tests on a real broker
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

up: setup ## Bring the whole mesh up (broker included) and print the endpoint
	$(BIN)/rendezvous up

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

bench: setup ## Benchmark S0-S3 side by side; writes docs/results/bench/ (BENCH_ARGS="--smoke": the CI check)
	$(PY) -m tools.bench $(BENCH_ARGS)

bench-smoke: setup ## Every system once at 20 req/s: are the figures complete and sane (part of make test)
	$(PY) -m tools.bench --smoke

profile: setup ## py-spy on every process of S2 under load (PROFILE_ARGS="--system S1 --rate 500")
	$(PY) -m tools.bench.profile $(PROFILE_ARGS)

clean: ## Remove the virtualenv, caches and run state (keeps the Pulsar download in ~/.m2)
	-tools/pulsar.sh down
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache
	rm -rf tools/tsgen/node_modules $(MODEL_TS)/node_modules $(MODEL_TS)/dist
