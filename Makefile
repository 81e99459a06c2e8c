# Every target creates .venv when it is missing and reinstalls only when
# pyproject.toml changed (the stamp file), so a second `make test` starts at once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# Tests and the demo must not depend on what a user has on the machine.
export RAY_AUTH_MODE ?= token
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-fast lint omniglot clean

# Where the Omniglot small background zips are; another copy works the same.
OMNIGLOT_DIR ?= ../shared/datasets/omniglot
# `make omniglot`'s training budget in minutes, shared equally by the members.
OMNIGLOT_TRAIN_MINUTES ?= 40

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(BIN)/fewshot demo

test: setup
	$(BIN)/python -m pytest -q --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not cluster"

# The headline model: the recipe trained on both small sets, promoted to
# models:/omniglot@champion (`fewshot omniglot`; resumes when interrupted).
omniglot: setup
	$(BIN)/fewshot omniglot --data $(OMNIGLOT_DIR) --minutes $(OMNIGLOT_TRAIN_MINUTES)

lint: setup
	$(BIN)/ruff check platform tests jobs
	$(BIN)/ruff format --check platform tests jobs

clean:
	rm -rf $(VENV) demo-output mlruns mlflow.db
