# fastvit: `make demo` and `make test` set everything up from this repository's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 and torchvision 0.29.1 come from this machine's local wheel cache; elsewhere from PyPI.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MAX_JOBS ?= 2
# Test workers (pytest-xdist, one module per worker at a time: module fixtures are built once; modules in collection
# order, which conftest.py starts with the few long ones, instead of xdist's most-tests-first that left them for the
# tail). The suite is mostly single-threaded Python (Triton's interpreter, small tensors): two workers use both of
# CI's cores.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: all install demo test test-fast bench lint format clean

all: test

# The stamp re-runs the install when packaging or extension sources change.
$(VENV)/.installed: pyproject.toml setup.py $(EXT_SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC) "setuptools>=77" wheel pybind11 ninja
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m fastvit demo

test: $(VENV)/.installed
	$(PY) -m pytest $(XDIST)

test-fast: $(VENV)/.installed
	$(PY) -m pytest $(XDIST) -x -q -k "not demo_default"

# Timed benchmarks on this machine (smoke sizes without a GPU), then the report (markdown + PNG).
bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-only --benchmark-json=bench-out/bench.json
	$(PY) -m benchmarks.report bench-out/bench.json --out bench-out

lint: $(VENV)/.installed
	$(PY) -m ruff check fastvit kernels tests benchmarks setup.py
	$(PY) -m ruff format --check fastvit kernels tests benchmarks setup.py

format: $(VENV)/.installed
	$(PY) -m ruff check --fix fastvit kernels tests benchmarks setup.py
	$(PY) -m ruff format fastvit kernels tests benchmarks setup.py

clean:
	rm -rf build dist *.egg-info fastvit/_C*.so runs .pytest_cache .ruff_cache
