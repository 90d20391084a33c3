# `make demo` and `make test` do all set-up on a fresh machine: a virtual environment in
# .venv with torch, this package and its test dependencies.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU/CUDA build this project is tested with; override, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/mtl compare configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
