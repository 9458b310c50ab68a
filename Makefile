# Entry points for a fresh machine: `make demo`, `make test` and `make lint`.
# Each creates .venv, installs the pinned CPU torch and this package (with the test extra,
# which pins ruff), then runs.
# Re-running is fast: the install step re-runs only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nemo-aot-installed

# Test workers: pytest-xdist, whole files per worker (--dist loadfile), so a module's shared
# training runs once. CI machines have 2 cores.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo test test-slow lint install clean test-compat test-compat-smoke

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	# Torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nemo-aot demo

test: $(STAMP)
	$(PYTEST)

# The multi-minute end-to-end runs (marked `slow`), kept out of `make test`; CI runs both.
test-slow: $(STAMP)
	$(PYTEST) -m slow

# The compatibility tier: the multi-rank layouts, LoRA, a checkpoint resume and the demo under
# megatron-core 0.17.0, 0.18.0 and 0.19.2, compared with 0.16.1's numbers (tests/compat/run.sh;
# one cached environment per release under .compat/). The smoke part (one release, a few
# minutes) runs in CI.
test-compat: $(STAMP)
	PY=$(abspath $(PY)) tests/compat/run.sh

test-compat-smoke: $(STAMP)
	PY=$(abspath $(PY)) tests/compat/run.sh --smoke 0.19.2

# ruff's settings (rules, line length, import order) are in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check nemo_aot scripts benchmarks tests

clean:
	rm -rf $(VENV) demo_output .pytest_cache .compat
