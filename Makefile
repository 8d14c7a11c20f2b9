# Two commands on a fresh machine: `make demo` and `make test` set up .venv when it is missing
# (or when pyproject.toml changed) and then do their job; later calls start at once.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build for dev and CI; the Docker image installs its own CUDA build.
TORCH  ?= torch==2.13.0
CHECKOV ?= 3.3.30
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench lint compile contract clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@# checkov pins an older `packaging` than pytest allows: it gets a venv of its own
	@test -x $(VENV)/tools/checkov/bin/checkov || ( $(PYTHON) -m venv $(VENV)/tools/checkov && \
	  $(VENV)/tools/checkov/bin/python -m pip install --quiet --disable-pip-version-check \
	  "checkov==$(CHECKOV)" )
	@touch $@

demo: setup
	$(BIN)/notellm2 demo --work work/demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python tests/benchmarks/run_all.py

lint: setup
	$(BIN)/ruff check .

compile: setup
	$(BIN)/notellm2 compile --output work/pipeline.yaml

contract: setup
	../shared/checks/contract

clean:
	rm -rf work .pytest_cache
