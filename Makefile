# evq: one command for the tests, one for the demo. Everything Python goes into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

# The local stack (make up / down / ps / demo): a redis-server and a supervisord of the
# project's own, with their state under $(VAR). CONCURRENCY, PROCESS_SECONDS, LEASE_SECONDS and
# the other settings pass through from the command line or the environment (they beat .env).
VAR ?= var
REDIS_PORT ?= 6379
NUMPROCS ?= 2
API_PORT ?= 8000
STATE := $(abspath $(VAR))
SUPERVISOR_CONF := docker/supervisor/supervisord.conf
STACK := PATH="$(abspath $(BIN)):$$PATH" EVQ_VAR=$(STATE) NUMPROCS=$(NUMPROCS) \
	REDIS_URL=redis://127.0.0.1:$(REDIS_PORT)/0 EVENT_LOG=$(STATE)/log/event.log API_PORT=$(API_PORT)
CTL := $(STACK) $(BIN)/supervisorctl -c $(SUPERVISOR_CONF)
REDIS_UP := $(STACK) $(BIN)/evq stats >/dev/null 2>&1

.PHONY: venv redis-server wrk test lint clean up down ps demo bench bench-full

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,plot]'
	@rm -f $(VENV)/.installed-* && touch $@

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

# The HTTP load tool of the API benchmark.
wrk:
	$(call need,wrk,wrk)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv redis-server lint
	$(BIN)/pytest

up: venv redis-server
	@mkdir -p $(STATE)/redis $(STATE)/log $(STATE)/run
	@if $(REDIS_UP); then echo "redis: already answering on port $(REDIS_PORT)"; else \
	  redis-server --port $(REDIS_PORT) --bind 127.0.0.1 --dir $(STATE)/redis --save "" \
	    --appendonly yes --daemonize yes --pidfile $(STATE)/run/redis.pid \
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
	@if pid=$$(cat $(STATE)/run/redis.pid 2>/dev/null) && kill $$pid 2>/dev/null; then \
	  while kill -0 $$pid 2>/dev/null; do sleep 0.1; done; echo "redis: stopped"; \
	else echo "redis: not running (or not started by make up)"; fi

ps: venv
	@$(CTL) status || true
	@if $(REDIS_UP); then echo "redis: up on port $(REDIS_PORT)"; $(STACK) $(BIN)/evq stats; \
	else echo "redis: not answering on port $(REDIS_PORT)"; fi

# The main job: 10,000 bursty events for 1,000 accounts through the running stack, then the report.
demo: up
	$(STACK) $(BIN)/gen --events 10000 --accounts 1000 --seed 1
	@$(STACK) $(BIN)/evq wait
	$(STACK) $(BIN)/evq report --plot $(STATE)/report.png
	@echo "The stack is still running: 'make ps' shows it, 'make down' stops it."

# Benchmarks: own redis-server and processes; results in bench/results/, docs/benchmarks.md.
bench: venv redis-server wrk
	$(BIN)/python -m bench.run

bench-full: venv redis-server wrk
	$(BIN)/python -m bench.run --full

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
