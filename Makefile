# The two commands of the README: `make demo` and `make test`. Both create (or reuse) .venv/.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test bench clean

# torch first, pinned: 2.13.0 is the CPU build this project tests on; an unpinned torch would pull
# a multi-GB CUDA build. platform/Dockerfile installs the CUDA build for GPU clusters instead.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m pipelines.demo

test: setup
	$(PY) -m pytest -q --durations=15

bench: setup
	$(PY) -m pip install --quiet -e ".[test,bench]"
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
