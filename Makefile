# Two commands on a fresh machine (Python 3.11, git, package registries):
#   make demo   set up .venv, then train, validate, export and register on the built-in digits
#   make test   set up .venv, then run the test suite
#   make docs   build the manual (docs/) into site/
# .venv holds exactly the versions of requirements.lock; `make lock` re-resolves pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
LOCK := requirements.lock
PIP_VERSION := 26.3
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/tmp/site-cache
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false

.PHONY: setup demo test lint docs bench clean lock label-studio-venv label-studio

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION)
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $@

# Resolve pyproject.toml anew in a scratch venv and pin every package it installed.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet pip==$(PIP_VERSION)
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	{ echo "# Every package of .venv for Python 3.11 on Linux x86-64, as make setup installs it:"; \
	  echo "#   pip install -c $(LOCK) -e '.[dev]'"; \
	  echo "# Made by make lock (pip freeze of a fresh venv): change pyproject.toml, then run it."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable; } > $(LOCK)
	rm -rf .lock-venv

demo: setup
	lensflow data
	lensflow run

# Test files run in TEST_WORKERS processes (pytest-xdist), each file whole in one of them: a
# module's shared fixture is built once. Most tests wait on subprocesses and servers, so two
# workers keep both cores of a 2-core machine busy. Files go out in collection order, the
# longest first (tests/conftest.py: SLOW_FILES_FIRST).
TEST_WORKERS ?= 2
test: setup
	python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

lint: setup
	ruff check cli components flows infra serving tests bench docs
	ruff format --check cli components flows infra serving tests bench docs

# The manual: docs/params.md from the params schema, then the site (site/); a broken link or
# anchor fails the build.
docs: setup
	python docs/params_reference.py
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet

bench: setup
	@for script in bench/*.py; do python $$script || exit 1; done

# Label Studio (the review queue) in a venv of its own: its pins conflict with the lock.
# `make label-studio` starts it offline on 127.0.0.1:8080, serving local files from this folder.
LS_VENV := .label-studio-venv
LS_VERSION := 1.23.2
# What label-studio leaves open and its version cannot take: sentry-sdk 3 removed an option
# it passes at start ("Unknown option 'send_default_pii'").
LS_PINS := 'sentry-sdk<3'
label-studio-venv: $(LS_VENV)/.installed

$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet pip==$(PIP_VERSION)
	$(LS_VENV)/bin/python -m pip install --quiet label-studio==$(LS_VERSION) $(LS_PINS)
	touch $@

label-studio: label-studio-venv
	LATEST_VERSION_CHECK=false LOCAL_FILES_SERVING_ENABLED=true \
	LOCAL_FILES_DOCUMENT_ROOT=$(CURDIR) LABEL_STUDIO_BASE_DATA_DIR=$(CURDIR)/.label-studio \
	$(LS_VENV)/bin/label-studio start --no-browser --internal-host 127.0.0.1 --port 8080

clean:  ## pipeline outputs only; data/raw and the MLflow database are kept
	rm -rf data/prepared models reports plots
