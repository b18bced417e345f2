# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Fetches the default model (SmolLM2-135M-Instruct, 93 MB) on first use, then serves it on
# 127.0.0.1:8000 without keys (local use), printing a curl and a Python example.
run: $(BIN)/.installed
	$(BIN)/ember serve --no-auth

test: $(BIN)/.installed
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	$(BIN)/python scripts/bench_offline.py
