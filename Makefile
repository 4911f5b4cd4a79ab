# Everything a fresh machine needs: `make test` (the test suite and the API reference) and `make run` (the main job).
# Both create .venv, install torch and build the extension (CUDA kernels too when nvcc is present).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: install test docs run bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel ninja

$(VENV)/.deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q torch numpy
	touch $@

# Rebuilds the extension only when a source or build file changed.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e '.[test,docs,bench]'
	touch $@

install: $(VENV)/.built

test: install docs
	$(PY) -m pytest -q tests

# The API reference (docs/_build/html), warnings as errors; -E rereads every page so none is skipped.
docs: install
	$(PY) -m sphinx -E -q -W --keep-going -b html docs docs/_build/html

# The main job: the experiment suite on the embedded digits, full sizes (about a minute on 2 CPU cores;
# `make run SUITE_FLAGS=--quick` for the small ones), its report written to $(REPORT_DIR)/report.md and printed;
# the exit status is the suite's (1: an experiment failed, 2: a usage error or missing data).
REPORT_DIR ?= fisherext-report
SUITE_FLAGS ?=
run: install
	$(PY) -m fisherext suite $(SUITE_FLAGS) --out '$(REPORT_DIR)'; status=$$?; \
	if [ -f '$(REPORT_DIR)/report.md' ]; then cat '$(REPORT_DIR)/report.md'; fi; exit $$status

# The full benchmark into bench/RESULTS.md, with the peers of the `bench` extra (installed with the others, so
# that tests/test_bench_peers.py checks every adapter; a peer missing shows as "not installed" in the tables).
bench: install
	$(PY) -m bench.run --md bench/RESULTS.md

# On a machine with a CUDA GPU: rebuild for the local torch (PYTHON's when it is a CUDA build, else the venv's;
# nothing is downloaded), then the CUDA tests, the cases past 2^31 elements, compute-sanitizer and bench --quick,
# in under 9 minutes (scripts/gpu_check.sh). Logs in GPU_CHECK_LOGS (default $OUT/gpu-check-logs when OUT is set,
# else gpu-check-logs/); exit status 2 without a CUDA device.
gpu-check:
	PYTHON='$(PYTHON)' VENV='$(VENV)' bash scripts/gpu_check.sh $(GPU_CHECK_LOGS)

clean:
	rm -rf build docs/_build fisherext/_C*.so *.egg-info $(VENV)/.built
