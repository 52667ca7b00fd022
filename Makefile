# Two entry points: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
# The venv gets torch first: `pip install $(TORCH)` (torch==2.13.0), so the project's torch>=2.3 bound is then met
# and nothing later pulls another build. A venv that already has a torch keeps it (a GPU user installs a CUDA build
# into .venv before `make setup`: README, "GPU"); TORCH may carry pip options, e.g.
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# and TORCH= (empty) installs no torch at all.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test setup setup-dev lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping the torch already in $(VENV): $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif [ -z "$(strip $(TORCH))" ]; then \
		echo "TORCH is empty: no torch installed first"; \
	else \
		echo "$(PY) -m pip install $(TORCH)"; $(PY) -m pip install $(TORCH); \
	fi
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -e ".[dev,compat,cluster]"
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
