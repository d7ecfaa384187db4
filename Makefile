# SpectralEarth pipeline. `make demo` and `make test` work on a machine with only Python 3.11 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MANIFEST ?= manifests/demo.yaml
BUILD ?= build/demo
INPUT ?= $(BUILD)-products
SCHEDULER ?= local
STAGE_ARGS = --manifest $(MANIFEST) --build $(BUILD) --scheduler $(SCHEDULER)

.PHONY: setup constraints demo test test-slow test-all lint inventory mask tile dedup write catalog report split labels export-benchmark bench clean

# The stamp is rebuilt whenever the package's requirements or their pinned versions change.
# constraints.txt holds the exact versions of the last green run, so a fresh clone installs what was
# tested (torch is not in it: .ci/run installs it separately; Chromium and PostgreSQL are Debian packages).
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,dev,serve]'
	touch $@

setup: $(BIN)/.installed

# Refresh constraints.txt: install the newest versions pyproject.toml allows into a scratch venv (without
# -c), freeze them, and remove the scratch venv. Run `make test` after it; commit the file only if green.
CONSTRAINTS_VENV := build/constraints-venv
constraints:
	rm -rf $(CONSTRAINTS_VENV)
	$(PYTHON) -m venv $(CONSTRAINTS_VENV)
	$(CONSTRAINTS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CONSTRAINTS_VENV)/bin/python -m pip install --quiet -e '.[test,dev,serve]'
	$(CONSTRAINTS_VENV)/bin/python -m pip freeze --exclude-editable > constraints.txt
	rm -rf $(CONSTRAINTS_VENV)

demo: setup
	$(BIN)/spectralearth demo --manifest $(MANIFEST) --build $(BUILD) --products $(INPUT) --scheduler $(SCHEDULER)

inventory: setup
	$(BIN)/spectralearth inventory $(STAGE_ARGS) --input $(INPUT)

mask tile dedup write catalog: setup
	$(BIN)/spectralearth $@ $(STAGE_ARGS)

report: setup
	$(BIN)/spectralearth report $(STAGE_ARGS)

# Downstream benchmarks (the manifest's labels section): label the patches, then export one of them
# in the authors' layout (make export-benchmark LABELS=demo_crops OUT=build/demo-benchmark).
labels: setup
	$(BIN)/spectralearth labels $(STAGE_ARGS)

LABELS ?= demo_crops
OUT ?= $(BUILD)-benchmark
BENCHMARK_SPLIT ?= random
export-benchmark: setup
	$(BIN)/spectralearth export-benchmark --build $(BUILD) --labels $(LABELS) --out $(OUT) --split $(BENCHMARK_SPLIT) --seed $(SEED)

SPLIT_NAME ?= blocked
SPLIT_KIND ?= blocked
SEED ?= 0
split: setup
	$(BIN)/spectralearth split --build $(BUILD) --name $(SPLIT_NAME) --kind $(SPLIT_KIND) --seed $(SEED)

# Full-size benchmarks (7-11 min on 2 cores with the products cached, +3 min the first time): ratios
# against the floor, the naive way and an S3 build from moto, in one run; the table goes to
# build/bench/results.json (bench/run.py --quick: the 1-5 minute smoke version on small products).
bench: setup
	$(BIN)/python bench/run.py

lint: setup
	$(BIN)/ruff check pipeline stac tests bench
	$(BIN)/ruff format --check pipeline stac tests bench
	$(BIN)/mypy

# `make test`: lint and every test except the slow end-to-end ones (marked `slow`: demo builds, faults,
# kills, outages), under 8 minutes on 2 cores. `make test-slow` runs only those; `make test-all` both,
# one after the other, so nothing runs twice (CI runs them all: .ci/run).
test: setup lint
	$(BIN)/python -m pytest -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -m slow

test-all: test
	$(MAKE) test-slow

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache .hypothesis
