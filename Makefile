# evq: one command for the tests, one for the demo. Everything Python goes into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The pinned, hashed dependencies (make lock writes them from pyproject.toml): dev.txt for
# .venv, app.txt (no test or plot extras) for the Docker image.
LOCK := requirements/dev.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)

# The local stack (make up / down / ps / demo / cluster-up / cluster-down) is the Python
# package stack/ (python -m stack --help). Its knobs and every evq setting pass through from
# make's command line or the environment (they beat .env): VAR (var), REDIS_PORT (6379),
# NUMPROCS (2), API_PORT (8000), CLUSTER=1 (use the local cluster), CLUSTER_PORT (7000),
# CLUSTER_NODE_TIMEOUT (3000 ms), CONCURRENCY, PROCESS_SECONDS, ...
STACK := $(BIN)/python -m stack

.PHONY: venv lock redis-server chromium wrk test check lint clean up down ps demo bench bench-full soak cluster-up cluster-down

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@rm -f $(VENV)/.installed-* && touch $@

# Pin every dependency again, newest that pyproject.toml allows, for any Python 3.11+ and
# platform (uv's universal resolution: a marker-guarded pin such as async-timeout for Python
# before 3.11.3 stays in), with the hashes of PyPI's files. uv lives in a venv of its own.
LOCK_WITH = --universal --python-version 3.11 --upgrade --generate-hashes --no-emit-index-url \
	--no-emit-find-links
lock:
	@test -x $(VENV)-lock/bin/uv || { $(PYTHON) -m venv $(VENV)-lock && \
	  $(VENV)-lock/bin/pip install --quiet uv; }
	$(VENV)-lock/bin/uv pip compile --quiet $(LOCK_WITH) --extra test --extra plot \
	  -o requirements/dev.txt pyproject.toml
	$(VENV)-lock/bin/uv pip compile --quiet $(LOCK_WITH) -o requirements/app.txt pyproject.toml

# $(call need,COMMAND,PACKAGE): install PACKAGE from the system packages when COMMAND is
# missing and we are root; otherwise say what to install.
need = @command -v $(1) >/dev/null 2>&1 || { \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
    echo "installing $(2) from the system packages"; \
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
  else \
    echo "$(1) is missing: run 'sudo apt-get install $(2)' (or put one on PATH)" >&2; exit 1; \
  fi; }

redis-server:
	$(call need,redis-server,redis-server)

# The browser of the dashboard and API-docs tests (driven by Playwright, no download of its own).
chromium:
	$(call need,chromium,chromium)

# The HTTP load tool of the API benchmark.
wrk:
	$(call need,wrk,wrk)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Everything: lint, types and every test, three at a time (most of them wait on real
# processes); the tests of the session's cluster share one worker, so one cluster starts.
# The fuzz runs on its own: its items share one node id, which xdist cannot tell apart.
test: venv redis-server chromium lint
	$(BIN)/pytest -n 3 --dist loadgroup -m "not fuzz"
	$(BIN)/pytest -m fuzz

# The edit-run loop, in seconds: lint, types, every test module imported (collected), then
# the unit tests, the in-process consumer tests and the engine suite on fakeredis.
check: venv lint
	$(BIN)/pytest -q --collect-only tests >/dev/null
	$(BIN)/pytest -q -m "not server" tests/unit tests/consumer tests/engine

up: venv redis-server
	@$(STACK) up

down: venv
	@$(STACK) down

ps: venv
	@$(STACK) ps

# The main job: 10,000 bursty events for 1,000 accounts through the running stack, the report.
demo: venv redis-server
	@$(STACK) demo

cluster-up: venv redis-server
	@$(STACK) cluster-up

cluster-down: venv
	@$(STACK) cluster-down

# Benchmarks: own redis-server and processes; results in bench/results/, docs/benchmarks.md.
bench: venv redis-server wrk
	$(BIN)/python -m bench.run

bench-full: venv redis-server wrk
	$(BIN)/python -m bench.run --full

# 30 minutes of API ingest with a fault every 20-40 s (bench/soak.py; MINUTES=3 for a short one).
MINUTES ?= 30
soak: venv redis-server
	$(BIN)/python -m bench.soak --minutes $(MINUTES)

clean:
	rm -rf $(VENV) $(VENV)-lock var .pytest_cache .mypy_cache .ruff_cache .hypothesis
