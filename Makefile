# Entry points: `make demo` (DRO on the NQ example), `make test` (the fast suite) and `make test-all` (adds the slow
# learning, benchmark and crash-safety tests; what CI runs). Each sets up .venv first.
# TORCH is installed before the package so pip never pulls a different build: torch==2.13.0 is a local CPU
# wheel on our CI machines and the CUDA build on PyPI elsewhere. GPU users with torch already installed
# can point VENV at their environment, or override TORCH (e.g. TORCH="torch --index-url ...").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all setup clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/dro optimize examples/nq/config.yaml

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

clean:
	rm -rf $(VENV) runs
