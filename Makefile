# Two commands on a fresh machine (Python 3.11, git, package registries):
#   make demo   set up .venv, then train, validate, export and register on the built-in digits
#   make test   set up .venv, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/tmp/site-cache
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	lensflow data
	lensflow run

test: setup
	python -m pytest -q

lint: setup
	ruff check components flows infra tests bench
	ruff format --check components flows infra tests bench

bench: setup
	@for script in bench/*.py; do python $$script || exit 1; done

clean:  ## pipeline outputs only; data/raw and the MLflow database are kept
	rm -rf data/prepared models reports plots
