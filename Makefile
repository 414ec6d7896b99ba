# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# TORCH is the torch this project is tested with (the CPU build from PyPI). It is installed only when the
# venv has no torch yet: a CUDA build installed into $(VENV) first is kept. `make setup TORCH=torch==X`
# pins another version.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,transformers]"
	touch $@

demo: setup
	$(BIN)/python -m kda_compile demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
