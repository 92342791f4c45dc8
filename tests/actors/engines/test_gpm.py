"""actors/engines/gpm.py: the General Preference Model judge, on tiny GPMs built here in the
published checkpoints' layout (`sppo.tiny_gpm`: a Llama checkpoint with `value_head.weight` and
`prompt_head.weight` beside `model.*`), saved and loaded as a real one is.

- The logits equal an independent computation: the published recipe (`gpm_example_usage.py`
  of the `general-preference-model` repository) written out here step by step from its code:
  its own model class (a `LlamaForCausalLM` whose heads are `nn.Linear`s), left padding, the
  forced EOS, the EOS index from the mask, the prompt's hidden state at `L - response_len - 1`,
  the block matrix R built entry by entry and `bmm`, then / tau.
- The matrix is skew-symmetric, so P = sigmoid(logit) and P + P^T = 1.
- A head set by hand to put three responses' embeddings 120 degrees apart gives the cyclic
  preferences of rock-paper-scissors, which no reward model can express.
- Batching across prompts (any token budget) equals one prompt at a time; a row longer than
  max_length is cut at its end and counted.
The judge contract and the Ray pool tests run on it in tests/actors/test_judge.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.engines.gpm import GPMEngine, gpm_scores, read_heads
from sppo.preference import preference_matrix, win_rates
from sppo.tiny_gpm import TinyGPMSpec, ensure_tiny_gpm, save_gpm

PROMPT = "tell me about the garden in the morning"
RESPONSES = ["the garden is green and the sun is warm", "a cat",
             "every flower opens early when the sky is bright and clear", "no"]


@pytest.fixture(scope="module")
def gpm_dir(tmp_path_factory) -> str:
    return str(ensure_tiny_gpm(tmp_path_factory.mktemp("tiny-gpm")))


@pytest.fixture(scope="module")
def engine(gpm_dir) -> GPMEngine:
    return GPMEngine(gpm_dir, max_length=64, max_batch_tokens=256, dtype="float32")


def _recipe(model_dir: str, prompt: str, chosen: str, rejected: str, max_length: int,
            tau: float = 0.1) -> float:
    """The published recipe, written out from `gpm_example_usage.py` (GPMPipeline.__call__,
    custom_forward, create_skew_symmetric_block_matrix, generate_high_dim_result_with_prompt):
    s(chosen beats rejected) / tau."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side, tok.truncation_side = "left", "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    heads = {}
    for f in __import__("pathlib").Path(model_dir).glob("*.safetensors"):
        heads.update({k: v for k, v in load_file(str(f)).items() if k.endswith("_head.weight")})

    class CustomRewardModel(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            d = heads["value_head.weight"].shape[0]
            self.value_head = torch.nn.Linear(config.hidden_size, d, bias=False)
            self.prompt_head = torch.nn.Linear(config.hidden_size, d // 2, bias=False)

    model = CustomRewardModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model.value_head.weight.copy_(heads["value_head.weight"])
        model.prompt_head.weight.copy_(heads["prompt_head.weight"])
    d = model.value_head.out_features

    def call(sample, return_prompt):
        text = tok.apply_chat_template(sample, tokenize=False)
        inputs = tok([text], truncation=True, max_length=max_length, padding=True,
                     return_tensors="pt")
        inputs["input_ids"][:, -1] = tok.eos_token_id
        inputs["attention_mask"][:, -1] = 1
        mask = inputs["attention_mask"]
        position_ids = mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(mask == 0, 1)
        out = model.model(inputs["input_ids"], attention_mask=mask, position_ids=position_ids)
        hidden = out["last_hidden_state"]
        values = model.value_head(hidden)
        eos = (mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1)).unsqueeze(1)
        reward = torch.cat([values[:, :, k].gather(dim=1, index=eos) for k in range(d)], dim=1)
        reward = torch.nn.functional.normalize(reward, p=2, dim=-1)
        if not return_prompt:
            return reward, None
        prompt_text = tok.apply_chat_template([sample[0]], tokenize=False)
        p_len = tok(prompt_text, max_length=max_length, padding=False, truncation=True,
                    return_tensors="pt")["attention_mask"].sum()
        c_len = tok(text, max_length=max_length, padding=False, truncation=True,
                    return_tensors="pt")["attention_mask"].sum()
        end = hidden.size(1) - (c_len - p_len) - 1
        return reward, hidden[:, end]

    with torch.no_grad():
        user = {"role": "user", "content": prompt}
        r1, h_prompt = call([user, {"role": "assistant", "content": chosen}], True)
        r2, _ = call([user, {"role": "assistant", "content": rejected}], False)
        lam = torch.softmax(model.prompt_head(h_prompt).view(1, d // 2), dim=-1)
        R = torch.zeros((1, d, d))
        for i in range(0, d, 2):
            R[:, i, i + 1] = -lam[:, i // 2]
            R[:, i + 1, i] = lam[:, i // 2]
        s = torch.bmm(torch.bmm(r1.view(1, 1, d), R.transpose(1, 2)), r2.view(1, d, 1))
    return float(s.view(1)) / tau


def test_logits_equal_the_published_recipe(gpm_dir, engine):
    mat = engine.logits([PROMPT], [RESPONSES])[0]
    for i, j in [(0, 1), (1, 0), (2, 3), (0, 2)]:
        assert mat[i, j] == pytest.approx(_recipe(gpm_dir, PROMPT, RESPONSES[i], RESPONSES[j],
                                                  max_length=64), abs=1e-4), (i, j)
    assert np.abs(mat).max() > 0.05  # the heads score something: not a trivial match


def test_a_row_past_max_length_is_cut_at_its_end_as_the_recipe_cuts_it(gpm_dir):
    short = GPMEngine(gpm_dir, max_length=28, max_batch_tokens=64, dtype="float32")
    long = RESPONSES[2] + " and " + RESPONSES[0]
    before = short.counters()["truncated_rows"]
    (logit,) = short.pair_logits([PROMPT], [long], [RESPONSES[1]])
    assert short.counters()["truncated_rows"] == before + 1
    assert logit == pytest.approx(_recipe(gpm_dir, PROMPT, long, RESPONSES[1], max_length=28),
                                  abs=1e-4)


def test_skew_symmetric_so_p_is_the_sigmoid_of_the_logit(engine):
    mat = engine.logits([PROMPT], [RESPONSES])[0]
    np.testing.assert_allclose(mat, -mat.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(mat), 0.0, atol=1e-9)
    probs = preference_matrix(mat, "direct").numpy()
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-mat)), atol=1e-9)
    assert engine.counters()["rows"] >= len(RESPONSES)


def test_the_closed_form_is_r_v_i_dot_v_j():
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(5, 6), dim=-1)
    lam = torch.softmax(torch.randn(3), dim=-1)
    R = torch.zeros(6, 6)
    for k in range(3):
        R[2 * k, 2 * k + 1], R[2 * k + 1, 2 * k] = -lam[k], lam[k]
    torch.testing.assert_close(gpm_scores(v, lam), (v @ R.T) @ v.T)


def test_batching_across_prompts_equals_one_prompt_at_a_time(gpm_dir):
    prompts = [PROMPT, "what is a good name for a cat", "hello"]
    cands = [RESPONSES, ["tom", "the little cat with a long name", "cat"],
             ["hi", "hello there my good friend, how are you today", "good morning", "yes"]]
    alone = GPMEngine(gpm_dir, max_length=64, max_batch_tokens=64, dtype="float32")
    packed = GPMEngine(gpm_dir, max_length=64, max_batch_tokens=4096, dtype="float32")
    each = [alone.logits([p], [c])[0] for p, c in zip(prompts, cands)]
    together = packed.logits(prompts, cands)
    assert packed.counters()["forward_passes"] == 1 < alone.counters()["forward_passes"]
    for a, b in zip(each, together):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_hand_set_head_gives_the_cycle_of_rock_paper_scissors(gpm_dir, tmp_path):
    """D = 2, no prompt head (lambda = 1): a value head solved so that the three responses'
    final hidden states map to unit vectors at 0, 120 and 240 degrees. Then s(a, b) =
    sin(120 deg) > 0 for a -> b -> c -> a: each beats the next and loses to the one before,
    P is cyclic, and the three win rates are equal (no ranking exists)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = GPMEngine(gpm_dir, max_length=64, max_batch_tokens=256, dtype="float32")
    rps = ["rock", "paper", "scissors"]
    rows = [engine._row(PROMPT, r)[0] for r in rps]
    with torch.no_grad():
        h = torch.stack([engine.model(input_ids=torch.tensor([row[:-1] + [
            engine.tokenizer.eos_token_id]])).last_hidden_state[0, -1] for row in rows])
    angles = torch.tensor([0.0, 2.0, 4.0]) * torch.pi / 3
    target = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # (3, 2)
    value = torch.linalg.lstsq(h, target).solution.T  # (2, hidden): h @ value.T = target
    model = AutoModelForCausalLM.from_pretrained(gpm_dir)
    out = save_gpm(tmp_path / "rps", model, AutoTokenizer.from_pretrained(gpm_dir), value)
    assert read_heads(str(out))[1] is None  # no prompt head
    cyclic = GPMEngine(str(out), max_length=64, max_batch_tokens=256, dtype="float32")
    mat = cyclic.logits([PROMPT], [rps])[0]
    probs = preference_matrix(mat, "direct").numpy()
    assert probs[0, 1] > 0.99 and probs[1, 2] > 0.99 and probs[2, 0] > 0.99, probs
    np.testing.assert_allclose(win_rates(torch.tensor(probs)).numpy(), [0.5] * 3, atol=1e-3)


def test_a_checkpoint_without_a_value_head_is_refused_by_name(tmp_path, tiny_llama_dir):
    with pytest.raises(ValueError, match="not a GPM checkpoint: no value_head.weight"):
        read_heads(tiny_llama_dir)


def test_the_tiny_gpm_is_laid_out_as_the_published_checkpoints(gpm_dir):
    from safetensors import safe_open
    import json
    from pathlib import Path

    (f,) = Path(gpm_dir).glob("*.safetensors")
    with safe_open(str(f), framework="pt") as st:
        keys = set(st.keys())
    spec = TinyGPMSpec()
    assert {"value_head.weight", "prompt_head.weight", "lm_head.weight",
            "model.embed_tokens.weight", "model.norm.weight"} <= keys
    assert not any(k.startswith("base_model") for k in keys)
    config = json.loads((Path(gpm_dir) / "config.json").read_text())
    assert config["model_type"] == "llama" and "value_head_dim" not in config
    value, prompt = read_heads(gpm_dir)
    assert value.shape == (spec.value_head_dim, spec.backbone.hidden_size)
    assert prompt.shape == (spec.value_head_dim // 2, spec.backbone.hidden_size)
