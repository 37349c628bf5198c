# The repo's vocabulary: `make demo` on a fresh clone sets everything up and shows the whole path working.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV := .venv
TOOLS := .tools
UV := $(TOOLS)/bin/uv
UV_VERSION := 0.13.9
# Remade when the lock or the project changes, or when the venv is removed.
SETUP_STAMP := $(VENV)/.setup-stamp
LINTED := services shared deploy tests bench
# mypy refuses a folder that holds no Python file, so it gets only those that do.
TYPED := $(foreach folder,$(LINTED),$(if $(shell find $(folder) -name '*.py' -print -quit 2>/dev/null),$(folder)))

.PHONY: help setup demo up down status test lint clean

help:
	@echo "make setup | demo | up | down | status | test | lint | clean"

setup: $(SETUP_STAMP)

$(UV):
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

# Bytecode is compiled once here: without it every process of the stack recompiles its imports at each start.
$(SETUP_STAMP): pyproject.toml uv.lock | $(UV)
	UV_PYTHON_DOWNLOADS=never $(UV) sync --frozen --compile-bytecode --python python3.11
	touch $@

demo: setup
	$(VENV)/bin/kiln demo

up: setup
	$(VENV)/bin/kiln up

down: setup
	$(VENV)/bin/kiln down

status: setup
	$(VENV)/bin/kiln status

test: setup
	tests/ensure_services.sh
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy $(TYPED)

# What `make setup` makes, never the data: the data folder holds the database, the secret key, the object store and
# the orgs' local stores, and only its owner deletes it.
clean:
	if [ -x $(VENV)/bin/kiln ]; then $(VENV)/bin/kiln down; fi
	rm -rf $(VENV) $(TOOLS)

# Serving, then training benchmarks; each prints its figures (README, "What serving costs" and "What the platform
# costs"). wrk, the load generator of bench/serve.py, is a Debian package: installed here when missing (as root).
# Pass options through, e.g. `make bench SERVE_ARGS="--json serve.json"`.
.PHONY: bench
bench: setup
	command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	$(VENV)/bin/python bench/serve.py $(SERVE_ARGS)
	$(VENV)/bin/python bench/train.py
