# Model Rollouts: `make demo` and `make test` work on a fresh machine (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv system-deps kube-bins setup crds crds-check lint test test-unit test-integration test-repeat \
        demo bench-stats bench-rollback bench-scale bench-status-size cluster-up cluster-down clean \
        tools image manifests chart e2e argocd-testdata

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,plugin]"
	touch $(STAMP)

venv: $(STAMP) ## create .venv with the package, the plugin's extra and the dev tools

system-deps: ## Debian packages: prometheus, openssl, tmux, chromium, nginx (installed when run as root)
	@command -v go >/dev/null || { echo "Go >= 1.25 is needed to build the Kubernetes test binaries (or set KUBEBUILDER_ASSETS)"; exit 1; }
	@missing=""; for c in prometheus openssl tmux chromium nginx; do command -v $$c >/dev/null || [ -x /usr/sbin/$$c ] || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    pkgs="$$missing"; \
	    echo "installing Debian packages:$$pkgs"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null; \
	  else echo "missing:$$missing; install them (Debian: apt-get install prometheus openssl tmux chromium nginx)"; exit 1; fi; \
	fi

kube-bins: ## build kube-apiserver, kube-controller-manager, kubectl once into .cache (or use KUBEBUILDER_ASSETS)
	@if [ -n "$$KUBEBUILDER_ASSETS" ] && [ -x "$$KUBEBUILDER_ASSETS/kube-apiserver" ]; then \
	  echo "using KUBEBUILDER_ASSETS=$$KUBEBUILDER_ASSETS"; bash hack/build-kube.sh --crds-only >/dev/null; \
	else bash hack/build-kube.sh >/dev/null; fi

setup: venv system-deps kube-bins

crds: venv ## regenerate crds/ from the pydantic models
	$(PY) -m model_rollouts.api.crdgen --out crds

lint: venv ## ruff and mypy
	$(VENV)/bin/ruff check operator tests
	$(VENV)/bin/ruff format --check operator tests
	$(VENV)/bin/mypy

# Two workers: real-stack tests mostly wait on intervals; a module stays on one worker (its stack is shared).
PYTEST_WORKERS ?= 2

test: setup lint ## the whole suite: unit, API, integration on the real local stack (2 workers)
	$(PY) -m pytest -q -rs --durations=25 -n $(PYTEST_WORKERS) --dist loadfile

T ?= tests/integration/test_rollout_faults.py
N ?= 10
J ?= 1
test-repeat: setup ## run T (a module or test id) N times in a row on the real stack: make test-repeat T=... N=10
	$(PY) -m tests.harness.repeat --count $(N) --jobs $(J) $(T)

test-unit: venv
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q -s tests/integration

demo: setup ## real control plane + Prometheus + model servers + traffic: one rollout promoted, one rolled back
	$(PY) -m tests.harness.demo

bench-stats: venv ## seeded simulation of our engine vs Flagger/Argo/Kayenta-style judges (11 scenarios; JSON last line)
	$(PY) -m tests.bench.bench_stats

bench-rollback: setup ## breach-to-weight-0 latency on the real stack (5 runs, 5s interval)
	$(PY) -m tests.bench.bench_rollback

bench-status-size: venv ## bytes of an object as LISTed and per status write after 500 analyses, before/after (JSON last line)
	$(PY) -m tests.bench.bench_status_size

bench-scale: N = 1000
bench-scale: setup ## N rollouts at a manual gate on the real stack: operator CPU, RSS, API/Prometheus load, probe latency; active, finished, deleted (JSON last line): make bench-scale N=1000 [BENCH_ARGS=--window 180]
	$(PY) -m tests.bench.bench_scale --n $(N) $(BENCH_ARGS)

cluster-up: setup ## start a local control plane; prints the KUBECONFIG path
	@$(PY) -m tests.harness.cluster up

cluster-down: ## stop it
	@$(PY) -m tests.harness.cluster down

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache

# -- Install: image, Helm chart, manifests, Argo CD (see README "Install") -----------------------
tools: ## build helm, helm-unittest, kubeconform and argocd-lua (gopher-lua, for the Argo CD checks) once into .cache
	bash hack/build-tools.sh >/dev/null

image: ## build the operator image with podman (Debian podman, runc, debootstrap; root)
	bash hack/build-image.sh

manifests: venv tools ## regenerate manifests/ (install, namespace-install, rbac, base, argocd-cm) from the chart
	$(PY) hack/gen-manifests.py

chart: venv tools ## helm lint, template matrix, helm-unittest, schema, stale manifests, Argo CD Lua, hadolint
	$(PY) -m pytest -q tests/install

e2e: setup tools image ## on the local API server: helm install/upgrade/uninstall, can-i, kubeconform; the image promotes a rollout
	$(PY) -m pytest -q -s tests/e2e

argocd-testdata: setup ## re-capture the Argo CD health/action fixtures from real objects on the local stack
	$(PY) -m tests.install.capture_argocd_testdata
