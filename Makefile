# covidray: two commands to know — `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real chest X-rays beside the project, when present; the demo synthesizes phantoms otherwise.
DATA ?= $(if $(wildcard ../shared/data/cxr/manifest.csv),../shared/data/cxr,)
WORKDIR ?= demo-output
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/covidray demo $(if $(DATA),--data $(DATA)) --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check covidray jobs serving tests bench

clean:
	rm -rf $(WORKDIR) .pytest_cache
