# `make demo` and `make test` do all set-up on a fresh machine: a virtual environment in
# .venv with torch, this package and its test dependencies.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU/CUDA build this project is tested with; override, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1

# Data sets that come as Debian packages (Fashion-MNIST's IDX files, WordNet's nouns): installed
# when running as root where apt-get exists; elsewhere the tests that need them skip and say how.
DEBIAN_DATA ?= dataset-fashion-mnist wordnet-base

.PHONY: install data demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The demo's cells run in parallel, one worker process per core, at most 4 (each worker holds
# its own torch); on one core the grid runs in this process. DEMO_WORKERS=1 runs it serially.
DEMO_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

demo: install
	$(BIN)/mtl compare configs/quickstart.yaml compare.workers=$(DEMO_WORKERS)

# Never fails the build: without root or apt the data stays missing and its tests skip.
data:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_DATA) >/dev/null) \
			|| echo "make data: apt-get could not install $(DEBIAN_DATA); the tests that need them will skip."; \
	else \
		echo "make data: not root or no apt-get; to get the data sets run: sudo apt-get install $(DEBIAN_DATA)"; \
	fi

test: install data
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
