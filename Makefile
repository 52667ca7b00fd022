# Two entry points: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
# The venv gets torch's CPU wheel first (torch==2.13.0), so nothing later can pull a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test setup setup-dev lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -e ".[dev,compat]"
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

demo: setup
	$(PY) cli.py run-all

test: setup-dev
	$(PY) -m pytest

lint: setup-dev
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs/demo
