"""Tests of actors/engines/vllm_generator.py against a stand-in `vllm` module (no GPU).

The stand-in records what the engine asks of vLLM and answers in the shape of vLLM's outputs
(`RequestOutput.outputs[j]` with `index`, `token_ids`, `text`, `finish_reason`, `logprobs`).
It checks this project's side of the contract (arguments built, outputs turned into records,
weight calls routed); that the names exist in vLLM 0.33 was checked by reading its sources,
and the real engine runs in tests/actors/test_generator.py wherever vLLM and a GPU exist.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace as NS

import numpy as np
import pytest

from sppo.records import Failed, Generation, Prompt


class FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.llm_engine = NS(model_config=NS(max_model_len=64))

    def get_tokenizer(self):
        return [0] * 100  # len() is the vocabulary size

    def generate(self, prompts, params, use_tqdm):
        self.calls.append(("generate", prompts, params))
        outs = []
        for prompt, sp in zip(prompts, params):
            samples = []
            for j in reversed(range(sp["n"])):  # vLLM does not promise index order
                ids = [sp["seed"] % 50 + j, 2] if j % 2 else [7] * sp["max_tokens"]
                samples.append(NS(index=j, token_ids=ids, text=f"t{j}",
                                  finish_reason="stop" if j % 2 else "length",
                                  logprobs=[{t: NS(logprob=-0.5)} for t in ids]))
            outs.append(NS(outputs=samples))
        return outs

    def __getattr__(self, name):  # weight-transfer and RPC methods: record the call
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


@pytest.fixture
def engine(monkeypatch, tiny_llama_dir):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kw: kw
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: kw
    config = types.ModuleType("vllm.config")
    config.WeightTransferConfig = lambda **kw: ("WeightTransferConfig", kw)
    for name, mod in (("vllm", vllm), ("vllm.inputs", inputs), ("vllm.config", config)):
        monkeypatch.setitem(sys.modules, name, mod)
    from actors.engines.vllm_generator import VLLMGenerationEngine

    return VLLMGenerationEngine(tiny_llama_dir, k=3, temperature=0.7, top_p=0.9,
                                max_new_tokens=5, seed=0, return_logprobs=True,
                                tensor_parallel_size=2, weight_transfer=True)


def test_builds_llm_and_turns_outputs_into_records(engine):
    from actors.engines.generation import prompt_seed

    kw = engine.llm.kwargs
    assert kw["distributed_executor_backend"] == "ray" and kw["tensor_parallel_size"] == 2
    assert kw["weight_transfer_config"] == ("WeightTransferConfig", {"backend": "nccl"})
    assert kw["worker_extension_cls"] == "actors.engines.vllm_generator.VLLMWorkerExtension"
    ok = Prompt(id="a", text="", token_ids=(3, 4))
    out = engine.generate([ok, Prompt(id="long", text="", token_ids=(3,) * 60)])
    _, prompts, params = engine.llm.calls[-1]
    assert prompts == [{"prompt_token_ids": [3, 4]}]
    assert params[0] == dict(n=3, temperature=0.7, top_p=0.9, max_tokens=5,
                             seed=prompt_seed(0, "a"), logprobs=0)
    g, failed = out
    assert isinstance(g, Generation) and isinstance(failed, Failed)
    assert g.finish_reasons == ["length", "stop", "length"] and g.texts == ["t0", "t1", "t2"]
    assert g.response_ids[1] == [prompt_seed(0, "a") % 50 + 1, 2]
    assert g.logprobs == [-2.5, -1.0, -2.5]


def test_weight_calls_are_routed(engine):
    engine.init_weight_transfer_engine({"init_info": {"rank": 1}})
    engine.start_weight_update()
    engine.update_weights({"update_info": {"names": ["x"]}})  # native: the trainer sends
    with pytest.raises(ValueError, match="unknown weight 'nope'"):
        engine.update_weights({"nope": np.zeros(2)})
    engine.update_weights({"model.norm.weight": np.ones(64, np.float32)})  # through the RPC
    assert engine.finish_weight_update() == 1
    engine.reload_weights("/ckpt", version=4)
    names = [c[0] for c in engine.llm.calls]
    assert names == ["init_weight_transfer_engine", "start_weight_update", "update_weights",
                     "collective_rpc", "finish_weight_update", "reset_prefix_cache",
                     "collective_rpc", "reset_prefix_cache"]
    assert engine.llm.calls[4][2] == {"weight_version": "1"}
    assert engine.llm.calls[6][2] == {"kwargs": {"weights_path": "/ckpt",
                                                 "is_checkpoint_format": True}}
    assert engine.weight_version == 4
