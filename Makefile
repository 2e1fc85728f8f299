# The entry points of configbus. `make demo` and `make test` work on a fresh machine:
# each sets up what it needs (virtual environment, packages, local Kafka and Redis).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXAMPLES_STAMP := $(VENV)/.installed-examples
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: help install demo demo-agent tour test lint typecheck unit integration services-up services-down bench bench-quick bench-micro clean

help:
	@echo "make demo           Kafka, Redis, the publisher and three example services: one live change"
	@echo "make demo-agent     the same, with the three services behind one host agent"
	@echo "make tour           validate, render and explain the sample environment tree"
	@echo "make test           lint, format check, mypy --strict and the whole test suite"
	@echo "make unit           only the tests that need no Kafka or Redis"
	@echo "make integration    only the tests against the real Kafka broker and Redis"
	@echo "make services-up    start the local Kafka broker and Redis (deploy/local)"
	@echo "make services-down  stop them"
	@echo "make bench          run every benchmark (long: e2e.py alone ~10 min), results in benchmarks/results/"
	@echo "                    (override.py: emergency overrides end to end, ~6 min, into override.json)"
	@echo "make bench-quick    a reduced set (a few minutes), results in benchmarks/results/quick/"
	@echo "make bench-micro    hot-path micro-benchmarks, quick (~15 s); fails on a >50% slower median"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP)

# The example services need FastAPI and uvicorn: the `examples` extra.
$(EXAMPLES_STAMP): $(STAMP)
	@echo "installing the examples extra (FastAPI, uvicorn) into $(VENV)"
	@$(BIN)/pip install --quiet -e '.[dev,examples]' >$(VENV)/examples-install.log 2>&1 || \
		{ cat $(VENV)/examples-install.log; exit 1; }
	@touch $@

# Starts its own Kafka, Redis, publisher daemon and services in a temp folder, on free
# ports, and stops them all when it ends (see examples/demo.py).
demo: $(EXAMPLES_STAMP)
	@$(BIN)/python examples/demo.py

demo-agent: $(EXAMPLES_STAMP)
	@$(BIN)/python examples/demo.py --agent

tour: install
	@PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/tour.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy --strict configbus

# Unit tests first: they need nothing running, so a broker that will not start cannot hide
# them. Coverage (line and branch, configbus/) adds up over both runs.
# The browser tests (the compliance report, the dashboard) drive Debian's chromium,
# installed here when missing; without it they are skipped, saying why.
test: lint typecheck
	@bash deploy/local/chromium.sh install >/dev/null || echo "no chromium: the browser tests will be skipped"
	$(BIN)/pytest -m "not integration" --cov --cov-report=
	$(BIN)/pytest -m integration --cov --cov-append --cov-report=term

unit: install
	$(BIN)/pytest -m "not integration"

integration: install
	$(BIN)/pytest -m integration

services-up:
	bash deploy/local/kafka.sh start
	bash deploy/local/redis.sh start

services-down:
	bash deploy/local/kafka.sh stop
	bash deploy/local/redis.sh stop

# The benchmarks need the `bench` extra (Dynaconf, OmegaConf, matplotlib, py-spy,
# pytest-benchmark).
$(BENCH_STAMP): $(STAMP)
	@echo "installing the bench extra (Dynaconf, OmegaConf, matplotlib, py-spy, pytest-benchmark) into $(VENV)"
	@$(BIN)/pip install --quiet -e '.[dev,bench]' >$(VENV)/bench-install.log 2>&1 || \
		{ cat $(VENV)/bench-install.log; exit 1; }
	@touch $@

# Each script starts the Kafka, Redis and etcd it needs (deploy/local, benchmarks/etcd.sh)
# on free ports and stops them when it ends, also when it fails. bench-quick writes to
# results/quick/ (git-ignored) and leaves the quoted figures, the READMEs and their plots
# alone.
QUICK := benchmarks/results/quick
MICRO := $(BIN)/pytest benchmarks/micro.py --benchmark-only -p no:cacheprovider -q
MICRO_FAIL ?= median:50%

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/resolve.py
	$(BIN)/python benchmarks/resolution_peers.py
	$(BIN)/python benchmarks/publish.py
	$(BIN)/python benchmarks/subscribe.py
	$(MICRO) --benchmark-json=benchmarks/results/micro.json
	$(BIN)/python benchmarks/e2e.py --rounds 3 --profile benchmarks/results/profile
	$(BIN)/python benchmarks/override.py --edits 30 --warmup 3 --rounds 2
	$(BIN)/python benchmarks/report.py

bench-quick: $(BENCH_STAMP)
	@mkdir -p $(QUICK) && printf '*\n' >$(QUICK)/.gitignore
	$(BIN)/python benchmarks/resolve.py --tenants 500 --repeat 300 --out $(QUICK)
	$(BIN)/python benchmarks/resolution_peers.py --repeat 20 --out $(QUICK)
	$(BIN)/python benchmarks/publish.py --edits 20 --tenants 100 --memory-tenants 0 --out $(QUICK)
	$(BIN)/python benchmarks/subscribe.py --repeat 100 --no-memory --out $(QUICK)
	$(MICRO) --benchmark-max-time=0.1 --benchmark-json=$(QUICK)/micro.json
	$(BIN)/python benchmarks/e2e.py --quick --out $(QUICK)
	$(BIN)/python benchmarks/override.py --n 1,10 --edits 10 --warmup 2 --idle 1 --warm-kafka 8 \
		--startup-runs 3 --out $(QUICK)
	cp README.md $(QUICK)/README.top.md
	$(BIN)/python benchmarks/report.py --results $(QUICK) \
		--bench-readme $(QUICK)/README.md --readme $(QUICK)/README.top.md

# Quick enough for CI: each run is saved under results/quick/micro/ and compared with the
# previous one saved there; a median more than MICRO_FAIL slower fails the target.
bench-micro: $(BENCH_STAMP)
	@mkdir -p $(QUICK) && printf '*\n' >$(QUICK)/.gitignore
	$(MICRO) --benchmark-max-time=0.1 --benchmark-min-rounds=20 \
		--benchmark-storage=file://$(QUICK)/micro --benchmark-autosave \
		$$(ls $(QUICK)/micro/*/*.json >/dev/null 2>&1 && \
			echo --benchmark-compare --benchmark-compare-fail=$(MICRO_FAIL))

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
