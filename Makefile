# Shoal's developer entry points. Everything runs in .venv in the repo root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: run test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# the core install: what `make run` needs, nothing more
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# the dev install: every extra, so that every test runs (torch first, pinned
# to the CPU build, so that the extra's range installs nothing more)
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev,torch,ray,he,mlflow,postgres,datasets,wasm]"
	touch $@ $(VENV)/.core

run: $(VENV)/.core
	$(BIN)/shoal simulate

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/python scripts/generate_protos.py --check

typecheck: $(VENV)/.dev
	$(BIN)/mypy

# the suite on every core (a test file stays on one worker: its module fixtures are built once)
test: lint typecheck
	$(BIN)/pytest -n auto --dist loadfile

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/aggregation.py
	$(BIN)/python benchmarks/simulation.py
	$(BIN)/python benchmarks/telemetry_cost.py
	$(BIN)/python benchmarks/registry.py
	$(BIN)/python benchmarks/network.py
	$(BIN)/python benchmarks/attestation.py
	$(BIN)/python benchmarks/replay_journal.py
	$(BIN)/python benchmarks/canary_exposure.py
	$(BIN)/python benchmarks/robustness.py --workers 2

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
