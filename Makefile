# From a fresh clone, one command each: `make run` (the main job) and `make test` (the test suite).
# Both create .venv if it is missing, install the CPU build of torch first (a bare `torch`
# requirement would pull several GB of CUDA packages), then the project with its test extra.
# Bring your own environment (a CUDA torch, say)? See "Set up by hand" in the README.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup run test test-slow lint

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup  ## the main job: Omniglot one-shot (extra flags: make run ARGS="--preset quick")
	$(PY) -m jobs.omniglot $(ARGS)

test: setup  ## the default tier (pytest's "no tests collected" counts as a pass)
	$(PY) -m pytest -q $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-slow: setup  ## the end-to-end tier: job smoke runs, the local cluster, node kills
	$(PY) -m pytest -q -m slow $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: setup
	$(PY) -m ruff check distmem jobs tests cluster
