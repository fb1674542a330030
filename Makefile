# fal-gateway-proxy: every entry point a developer or CI needs.
# `make test` installs what the tests need (Python venv, the pinned fal JS SDK) and runs them.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SDK_DIR := tests/sdk
RECIPES_DIR := tests/recipes

.PHONY: install runtime venv-matches-python demo run emulator check test test-unit test-e2e test-recipes bench bench-callers soak clean

# A PYTHON given for an existing $(VENV) made by another Python would silently not be used
# (and the venv not rebuilt): refuse, so `make test PYTHON=python3.13` really runs 3.13.
venv-matches-python:
	@[ "$(origin PYTHON)" = file ] || [ ! -e $(PY) ] || \
	[ "$$($(PYTHON) -c 'import sys; print(sys.version)')" = "$$($(PY) -c 'import sys; print(sys.version)')" ] || \
	{ echo "$(VENV) was made by another Python than $(PYTHON): add VENV=.venv-<version>" >&2; exit 1; }

# Two steps: the proxy's runtime (all that demo, run and emulator need), then the tools the
# tests, benchmarks and checks add. Each says what it does; pip shows what it fetches.
$(VENV)/.runtime: pyproject.toml | venv-matches-python
	@echo "make: creating $(VENV) and installing the proxy's runtime (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	@echo "make: adding the test, benchmark and check tools to $(VENV) (first run only)"
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -e '.[test,bench,check]'
	touch $@

runtime: $(VENV)/.runtime
install: $(VENV)/.installed

$(SDK_DIR)/node_modules/.package-lock.json: $(SDK_DIR)/package-lock.json
	npm ci --prefix $(SDK_DIR) --no-audit --no-fund
	touch $@

# Try it with no account: the proxy, the offline fal + gateway emulator and a demo page,
# on http://127.0.0.1:8787/ (DEMO_ARGS: e.g. --port 9999). No real fal call is made.
demo: runtime
	$(VENV)/bin/fal-gateway-proxy demo $(DEMO_ARGS)

# The emulator alone, for your own app's tests: gateway URL http://127.0.0.1:9000/v1/x/y/fal
emulator: runtime
	$(VENV)/bin/fal-gateway-proxy emulator $(EMULATOR_ARGS)

# Run the proxy with the settings in the environment (see README: FAL_KEY, CF_ACCOUNT_ID, ...).
run: runtime
	$(VENV)/bin/fal-gateway-proxy

# Lint, format and types (pinned in pyproject's "check" extra); CI runs it before the tests.
check: install
	$(VENV)/bin/ruff check proxy tests bench
	$(VENV)/bin/ruff format --check proxy tests bench
	$(VENV)/bin/mypy

# Under coverage, subprocesses included (pyproject [tool.coverage]); fails below the floor.
# TEST_JOBS pytest processes (pytest-xdist), each running whole test files: most tests wait on
# real processes and sockets, so two halve the suite's time even on a 2-core machine.
TEST_JOBS ?= 2
test: install $(SDK_DIR)/node_modules/.package-lock.json
	$(PY) -m coverage erase
	$(PY) -m coverage run -m pytest -n $(TEST_JOBS) --dist loadfile
	$(PY) -m coverage combine --quiet
	$(PY) -m coverage report

test-unit: install
	$(PY) -m pytest tests/unit

test-e2e: install $(SDK_DIR)/node_modules/.package-lock.json
	$(PY) -m pytest tests/e2e

# The README's dev-server recipes run for real (tests/e2e/test_recipes.py): a Vite and a
# Next.js app in tests/recipes/ (about 400 MB of node_modules, installed from its lockfile),
# the fal JS SDK in Chromium through each. Not part of `make test`.
$(RECIPES_DIR)/node_modules/.package-lock.json: $(RECIPES_DIR)/package-lock.json
	npm ci --prefix $(RECIPES_DIR) --no-audit --no-fund
	touch $@

test-recipes: install $(SDK_DIR)/node_modules/.package-lock.json $(RECIPES_DIR)/node_modules/.package-lock.json
	$(PY) -m pytest -m recipes tests/e2e/test_recipes.py

# Benchmark the proxy against a local fake gateway (bench/README.md), its instructions per
# request against the bare forwarder (bench/instructions.py, callgrind), then how its per-caller
# auth, limits and quotas scale with 1 to 100,000 callers, timed (bench/callers.py, ~15 min)
# and counted under callgrind (bench/callers_instructions.py, ~35 min). Needs wrk,
# redis-server and valgrind, installed here if missing. BENCH_ARGS: e.g. --quick, --json
# bench/results/latest.json, --profile PATH. CALLERS_ARGS: e.g. --quick, --callers 1,1000.
# COUNTED_ARGS: e.g. --auth token --backend memory.
bench: install
	command -v wrk >/dev/null || { apt-get update && apt-get install -y wrk; }
	command -v redis-server >/dev/null || { apt-get update && apt-get install -y redis-server; }
	command -v valgrind >/dev/null || { apt-get update && apt-get install -y valgrind; }
	npm ci --prefix bench/express_proxy --no-audit --no-fund
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/instructions.py
	$(PY) bench/callers.py $(CALLERS_ARGS)
	$(PY) bench/callers_instructions.py $(COUNTED_ARGS)

# The per-caller scaling benchmark alone (bench/README.md). BENCH_ARGS: e.g. --quick,
# --callers 1,100000 --auth jwt --backend memory, --seconds 30, --json PATH.
bench-callers: install
	command -v wrk >/dev/null || { apt-get update && apt-get install -y wrk; }
	command -v redis-server >/dev/null || { apt-get update && apt-get install -y redis-server; }
	$(PY) bench/callers.py $(BENCH_ARGS)

# Soak and fault runs on loopback (bench/README.md): 10,000 requests at 256 connections,
# 1,000 SSE streams, 300 WebSockets, upstream and client faults, SIGTERM; a pass/fail table.
# Not part of `make test`. SOAK_ARGS: e.g. --quick, --json bench/results/soak.json, --only sse,ws.
soak: install
	$(PY) bench/soak.py $(SOAK_ARGS)

# docs/configuration.md, written from the settings' declarations in proxy/config/ (a unit
# test fails when it is stale). Through a temporary file, so a failure leaves the old one.
.PHONY: docs
docs: install
	$(PY) -m proxy.config.reference > docs/configuration.md.tmp
	mv docs/configuration.md.tmp docs/configuration.md

clean:
	rm -rf $(VENV) $(SDK_DIR)/node_modules tests/recipes/node_modules .pytest_cache build *.egg-info
