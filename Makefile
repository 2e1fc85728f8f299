# The entry points of configbus. `make demo` and `make test` work on a fresh machine:
# each sets up what it needs (virtual environment, packages, local Kafka and Redis).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXAMPLES_STAMP := $(VENV)/.installed-examples

.PHONY: help install demo tour test lint typecheck unit integration services-up services-down bench clean

help:
	@echo "make demo           Kafka, Redis, the publisher and three example services: one live change"
	@echo "make tour           validate, render and explain the sample environment tree"
	@echo "make test           lint, format check, mypy --strict and the whole test suite"
	@echo "make unit           only the tests that need no Kafka or Redis"
	@echo "make integration    only the tests against the real Kafka broker and Redis"
	@echo "make services-up    start the local Kafka broker and Redis (deploy/local)"
	@echo "make services-down  stop them"
	@echo "make bench          run the benchmarks, results in benchmarks/results/"

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

tour: install
	@PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/tour.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy --strict configbus

test: lint typecheck
	$(BIN)/pytest

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

bench: install
	$(BIN)/python benchmarks/resolve.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
