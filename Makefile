# The developer interface: the same commands in README, CI and your hands.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch; pyproject accepts a range so GPU users get CUDA builds.
TORCH_PIN ?= torch==2.13.0
PROTOS := $(wildcard protos/spool/v1/*.proto)

.PHONY: help bootstrap run control worker test test-all fuzz proto proto-check lint format bench bench-peers chaos demo clean

help:
	@echo "make run      start embedded Postgres + control plane + one worker"
	@echo "make test     run the whole test suite"
	@echo "make fuzz     the fuzz tests (tests/fuzz) with ten times the examples"
	@echo "make proto    regenerate Python stubs from protos/"
	@echo "make lint     ruff + buf lint + stale-stub check"
	@echo "make bench    write benchmark figures to bench/report.md"
	@echo "make chaos    kill/stop workers and replicas, restart Postgres under load; check invariants"
	@echo "make bench-peers  only the throughput bench: Spool beside pgqueuer and Celery"
	@echo "make demo     a 5-minute tour: remove an overlay from a clip"

bootstrap: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e '.[worker,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m control.devrun

control: $(STAMP)
	$(BIN)/spool-control

worker: $(STAMP)
	$(BIN)/spool-worker

test: $(STAMP) proto-check
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	SPOOL_SLOW=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

fuzz: $(STAMP)
	SPOOL_SLOW=1 $(BIN)/python -m pytest -q tests/fuzz $(PYTEST_ARGS)

proto: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTOS)

# Fails when the committed stubs differ from what the protos generate.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && \
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp $(PROTOS) && \
	for f in $$tmp/spool/v1/*; do \
		cmp -s "$$f" "spool/v1/$$(basename $$f)" || { echo "stale stub: spool/v1/$$(basename $$f) (run make proto)"; exit 1; }; \
	done && rm -rf $$tmp && echo "stubs up to date"

lint: $(STAMP) proto-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd protos && ../$(BIN)/buf lint

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The peers of bench.throughput (pgqueuer, Celery) come from the `bench` extra;
# Celery's broker is redis-server from Debian (skipped with a message if absent).
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench

# Faults under load, then every invariant checked (docs/control-plane.md, "Chaos run").
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)

bench-peers: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench --only throughput

demo: $(STAMP)
	$(BIN)/python -m bench.demo

clean:
	rm -rf $(VENV) .spool .pytest_cache build *.egg-info
