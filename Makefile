# covidray: two commands to know — `make demo` and `make test` (`make test-fast` while editing).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real chest X-rays beside the project, when present; the demo synthesizes phantoms otherwise.
DATA ?= $(if $(wildcard ../shared/data/cxr/manifest.csv),../shared/data/cxr,)
# Frontal and lateral films for the input gate's view check, when present.
VIEWS ?= $(if $(wildcard ../shared/data/views/manifest.csv),../shared/data/views,)
WORKDIR ?= demo-output
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test test-fast bench ablation lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/covidray demo $(if $(DATA),--data $(DATA)) $(if $(VIEWS),--views $(VIEWS)) --workdir $(WORKDIR)

# Everything, against real local parts (Ray, a moto S3 server, helm); the slowest tests listed.
test: $(STAMP)
	@scripts/install_orthanc.sh
	$(BIN)/python -m pytest -q --durations=25

# The inner loop: no Ray cluster, no S3 server, no training (tests/conftest.py marks the rest).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Speed: scoring pipelines and a training epoch, each against a baseline in the same run.
bench: $(STAMP)
	@for b in bench/score.py bench/train.py bench/serve.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Hours on a CPU: CycleGAN images in or out of the classifier's training set.
ablation: $(STAMP)
	$(BIN)/python bench/gan_ablation.py $(ABLATION_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check covidray jobs serving tests bench

clean:
	rm -rf $(WORKDIR) .pytest_cache
