# The entry points of configbus. `make demo` and `make test` work on a fresh machine:
# each sets up what it needs (virtual environment, packages, local Kafka and Redis).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install demo test lint typecheck unit integration services-up services-down bench clean

help:
	@echo "make demo           resolve, validate and explain the sample environment tree"
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

demo: install
	@PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

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
