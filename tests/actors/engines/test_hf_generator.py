"""Tests of actors/engines/hf_generator.py without Ray: greedy decoding, weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.engines.hf_generator import HFGenerationEngine
from sppo.records import Failed, Generation, Prompt


def _engine(model_dir: str, **kw) -> HFGenerationEngine:
    args = dict(k=2, temperature=0.8, top_p=0.9, max_new_tokens=6, seed=0, return_logprobs=True)
    return HFGenerationEngine(model_dir, **{**args, **kw})


@pytest.fixture(scope="module")
def prompts(tiny_llama_dir) -> list[Prompt]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return [Prompt(id=f"p{i}", text=t, token_ids=tuple(tok(t)["input_ids"]))
            for i, t in enumerate(["hello there my good friend", "hi"])]


def test_temperature_zero_is_greedy(tiny_llama_dir, prompts):
    """Greedy: every sample is the argmax continuation, computed here token by token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    gens = _engine(tiny_llama_dir, temperature=0.0).generate(prompts)
    for g in gens:
        seq = list(g.prompt.token_ids)
        for _ in range(6):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert g.response_ids == [seq[len(g.prompt.token_ids):]] * 2


def test_a_vanishing_chat_temperature_is_greedy(tiny_llama_dir, prompts):
    """A temperature below 1e-5 (the control service accepts any in [0, 2]; its fuzzing sent
    2e-289) decodes greedily, as vLLM does, instead of dividing the logits into inf."""
    engine = _engine(tiny_llama_dir)
    ids = prompts[0].token_ids
    greedy = engine.chat(ids, max_tokens=5, temperature=0.0, top_p=1.0, n=2, seed=0)
    tiny = engine.chat(ids, max_tokens=5, temperature=2e-289, top_p=1.2e-7, n=2, seed=0)
    assert [a["text"] for a in tiny] == [a["text"] for a in greedy]
    assert all(a["completion_tokens"] == 5 or a["finish_reason"] == "stop" for a in tiny)


def test_load_weights_checks_everything_before_copying(tiny_llama_dir):
    engine = _engine(tiny_llama_dir)
    before = engine.state_dict_numpy()
    name = "model.norm.weight"
    good = np.full_like(before[name], 2.0)
    good.flags.writeable = False  # as the object store hands arrays out
    with pytest.raises(ValueError, match="not.a.weight"):
        engine.load_weights([(name, good), ("not.a.weight", good)])
    with pytest.raises(ValueError, match="lm_head.weight.*shape"):
        engine.load_weights([(name, good), ("lm_head.weight", good)])
    assert np.array_equal(engine.state_dict_numpy()[name], before[name])  # nothing copied
    engine.update_weights({name: good})
    assert np.array_equal(engine.state_dict_numpy()[name], good)
    assert engine.finish_weight_update() == 1 and engine.finish_weight_update(5) == 5


def test_reload_weights_from_a_checkpoint_dir(tiny_llama_dir, tmp_path, prompts):
    from transformers import AutoTokenizer

    from sppo.tiny import TinySpec, build_tiny_llama

    other = build_tiny_llama(TinySpec(seed=1), tokenizer=AutoTokenizer.from_pretrained(
        tiny_llama_dir))
    other.save_pretrained(tmp_path)
    engine = _engine(tiny_llama_dir)
    engine.reload_weights(str(tmp_path), version=2)
    got = engine.generate(prompts)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path)
    want = _engine(str(tmp_path)).generate(prompts)
    assert [g.response_ids for g in got] == [g.response_ids for g in want]
    assert all(g.weight_version == 2 for g in got)


def test_prompts_it_cannot_take_fail_alone(tiny_llama_dir, prompts):
    bad = Prompt(id="bad", text="", token_ids=(1, 10**6))  # outside the vocabulary
    out = _engine(tiny_llama_dir).generate([bad, prompts[1]])
    assert isinstance(out[0], Failed) and "vocabulary" in out[0].reason
    assert isinstance(out[1], Generation)
