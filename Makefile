# LocalMoE — the two commands of the README, and the checks behind them.
#   make up     install what is needed, then start the whole service (Redis, worker(s), API, Flower)
#   make test   install what is needed, then run every check: ruff, mypy, pytest
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test check lint types pytest bench install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# On a GPU box keep the CUDA torch the image brings; elsewhere take the CPU build (no CUDA download).
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,deepspeed]'
	@touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/localmoe up

test: check pytest

check: lint types

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.service_vs_engine

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
