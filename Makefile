# evq: one command for the tests, one for the demo. Everything Python goes into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The pinned, hashed dependencies (make lock writes them from pyproject.toml): dev.txt for
# .venv, app.txt (no test or plot extras) for the Docker image.
LOCK := requirements/dev.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)

# The local stack (make up / down / ps / demo): a redis-server and a supervisord of the
# project's own, with their state under $(VAR). CONCURRENCY, PROCESS_SECONDS, LEASE_SECONDS and
# the other settings pass through from the command line or the environment (they beat .env).
# CLUSTER=1 runs the stack on the local Redis Cluster of `make cluster-up` instead.
VAR ?= var
REDIS_PORT ?= 6379
CLUSTER_PORT ?= 7000
NUMPROCS ?= 2
API_PORT ?= 8000
STATE := $(abspath $(VAR))
SUPERVISOR_CONF := docker/supervisor/supervisord.conf
ifeq ($(CLUSTER),1)
STACK_REDIS := redis+cluster://127.0.0.1:$(CLUSTER_PORT)
else
STACK_REDIS := redis://127.0.0.1:$(REDIS_PORT)/0
endif
STACK := PATH="$(abspath $(BIN)):$$PATH" EVQ_VAR=$(STATE) NUMPROCS=$(NUMPROCS) \
	REDIS_URL=$(STACK_REDIS) EVENT_LOG=$(STATE)/log/event.log API_PORT=$(API_PORT)
CTL := $(STACK) $(BIN)/supervisorctl -c $(SUPERVISOR_CONF)
REDIS_UP := $(STACK) $(BIN)/evq stats >/dev/null 2>&1

.PHONY: venv lock redis-server chromium wrk test lint clean up down ps demo bench bench-full soak cluster-up cluster-down

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

test: venv redis-server chromium lint
	$(BIN)/pytest

up: venv redis-server
	@mkdir -p $(STATE)/redis $(STATE)/log $(STATE)/run
	@if [ "$(CLUSTER)" = 1 ]; then $(REDIS_UP) || { echo "no Redis Cluster answering on port" \
	  "$(CLUSTER_PORT): run 'make cluster-up' first" >&2; exit 1; }; \
	  echo "redis: the cluster on port $(CLUSTER_PORT)"; touch $(STATE)/run/on-cluster; \
	elif $(REDIS_UP); then echo "redis: already answering on port $(REDIS_PORT)"; else \
	  redis-server --port $(REDIS_PORT) --bind 127.0.0.1 --dir $(STATE)/redis --save "" \
	    --appendonly yes --maxmemory-policy noeviction --daemonize yes \
	    --pidfile $(STATE)/run/redis.pid \
	    --logfile $(STATE)/log/redis.log; \
	  for i in $$(seq 50); do $(REDIS_UP) && break; sleep 0.1; done; \
	  $(REDIS_UP) || { echo "redis did not start: see $(STATE)/log/redis.log" >&2; exit 1; }; \
	  echo "redis: started on port $(REDIS_PORT), AOF in $(STATE)/redis"; fi
	@if $(CTL) pid >/dev/null 2>&1; then \
	  echo "supervisord: already running (make down first to change NUMPROCS)"; else \
	  $(STACK) $(BIN)/supervisord -c $(SUPERVISOR_CONF) && \
	  echo "supervisord: starting $(NUMPROCS) consumers and the API on port $(API_PORT)," \
	    "logs in $(STATE)/log"; fi
	@$(STACK) $(BIN)/evq wait --consumers $(NUMPROCS) --timeout 60
	@$(CTL) status

down: venv
	@if pid=$$(cat $(STATE)/run/supervisord.pid 2>/dev/null) && kill -0 $$pid 2>/dev/null; then \
	  $(CTL) shutdown >/dev/null; while kill -0 $$pid 2>/dev/null; do sleep 0.2; done; \
	  echo "supervisord: stopped (consumers drained their current events)"; \
	else echo "supervisord: not running"; fi
	@rm -f $(STATE)/run/on-cluster
	@if [ "$(CLUSTER)" = 1 ]; then echo "redis: the cluster keeps running ('make cluster-down')"; \
	elif pid=$$(cat $(STATE)/run/redis.pid 2>/dev/null) && kill $$pid 2>/dev/null; then \
	  while kill -0 $$pid 2>/dev/null; do sleep 0.1; done; echo "redis: stopped"; \
	else echo "redis: not running (or not started by make up)"; fi

ps: venv
	@$(CTL) status || true
	@if $(REDIS_UP); then echo "redis: up at $(STACK_REDIS)"; $(STACK) $(BIN)/evq stats; \
	else echo "redis: not answering at $(STACK_REDIS)"; fi

# The main job: 10,000 bursty events for 1,000 accounts through the running stack, then the report.
demo: up
	$(STACK) $(BIN)/gen --events 10000 --accounts 1000 --seed 1
	@$(STACK) $(BIN)/evq wait
	$(STACK) $(BIN)/evq report --plot $(STATE)/report.png
	@echo "The stack is still running: 'make ps' shows it, 'make down' stops it."

# A local Redis Cluster: 3 masters + 3 replicas from the same redis-server package, on
# CLUSTER_PORT..CLUSTER_PORT+5 (cluster bus on +10000), AOF on, state in $(VAR)/cluster/<port>.
# Created once; after cluster-down the nodes come back from their nodes.conf with their data.
# A master unreachable this long (ms) is failed over to its replica (Redis' default: 15000).
CLUSTER_NODE_TIMEOUT ?= 3000
CLUSTER_PORTS = $(shell seq $(CLUSTER_PORT) $$(($(CLUSTER_PORT) + 5)))
CLUSTER_DIR := $(STATE)/cluster
CLI = redis-cli -h 127.0.0.1 -p

cluster-up: redis-server
	@for port in $(CLUSTER_PORTS); do mkdir -p $(CLUSTER_DIR)/$$port; \
	  if $(CLI) $$port ping >/dev/null 2>&1; then echo "node $$port: already answering"; \
	  else redis-server --port $$port --bind 127.0.0.1 --cluster-enabled yes \
	    --cluster-node-timeout $(CLUSTER_NODE_TIMEOUT) --cluster-config-file nodes.conf \
	    --dir $(CLUSTER_DIR)/$$port --appendonly yes --save "" \
	    --maxmemory-policy noeviction --shutdown-on-sigterm now --daemonize yes \
	    --pidfile $(CLUSTER_DIR)/$$port/redis.pid \
	    --logfile $(CLUSTER_DIR)/$$port/redis.log; fi; \
	  for i in $$(seq 50); do $(CLI) $$port ping >/dev/null 2>&1 && break; sleep 0.1; done; \
	  $(CLI) $$port ping >/dev/null 2>&1 || { echo "node $$port did not start:" \
	    "see $(CLUSTER_DIR)/$$port/redis.log" >&2; exit 1; }; done
	@if $(CLI) $(CLUSTER_PORT) cluster info | grep -q '^cluster_slots_assigned:0'; then \
	  redis-cli --cluster create $(foreach port,$(CLUSTER_PORTS),127.0.0.1:$(port)) \
	    --cluster-replicas 1 --cluster-yes >$(CLUSTER_DIR)/create.log 2>&1 || { \
	    echo "cluster create failed: see $(CLUSTER_DIR)/create.log" >&2; exit 1; }; fi
	@settled() { $(CLI) $(CLUSTER_PORT) cluster info | grep -q '^cluster_state:ok' && \
	  [ "$$($(CLI) $(CLUSTER_PORT) cluster nodes | grep -c slave)" = 3 ] || return 1; \
	  for port in $(CLUSTER_PORTS); do info=$$($(CLI) $$port info); \
	    echo "$$info" | grep -q '^aof_rewrite_in_progress:0' || return 1; \
	    echo "$$info" | grep -q '^aof_rewrite_scheduled:0' || return 1; \
	    if echo "$$info" | grep -q '^role:slave'; then \
	      echo "$$info" | grep -q '^master_link_status:up' || return 1; fi; done; }; \
	for i in $$(seq 300); do settled && break; sleep 0.1; done; \
	settled || { echo "cluster not settled after 30 s: see $(CLUSTER_DIR)/*/redis.log" >&2; \
	  exit 1; }
	@echo "cluster: 3 masters + 3 replicas on 127.0.0.1:$(CLUSTER_PORT)-$$(($(CLUSTER_PORT) + 5))," \
	  "AOF in $(CLUSTER_DIR)"

# All nodes at once, each flushing its own AOF: one by one, a master would wait for replicas
# that are already gone. A node busy with its first AOF refuses a SIGTERM, so it is asked
# again every second; after 30 s it is killed. A stack that `make up CLUSTER=1` started stops first.
cluster-down:
	@if [ -e $(STATE)/run/on-cluster ]; then $(MAKE) --no-print-directory down CLUSTER=1; fi
	@pids=""; for port in $(CLUSTER_PORTS); do \
	  if pid=$$(cat $(CLUSTER_DIR)/$$port/redis.pid 2>/dev/null) && kill $$pid 2>/dev/null; then \
	    pids="$$pids $$pid"; echo "node $$port: stopping"; \
	  else echo "node $$port: not running (or not started by make cluster-up)"; fi; done; \
	for pid in $$pids; do for i in $$(seq 300); do kill -0 $$pid 2>/dev/null || break; \
	    [ $$((i % 10)) = 0 ] && kill $$pid 2>/dev/null; sleep 0.1; done; \
	  if kill -0 $$pid 2>/dev/null; then kill -9 $$pid; \
	    echo "node pid $$pid did not stop within 30 s: killed" >&2; fi; done; \
	[ -z "$$pids" ] || echo "cluster: stopped"

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
