"""The batched PairRM engine against llm-blender's own API on a tiny DeBERTa-v2 PairRM.

Derivations checked here:
- `Blender.compare(x, a, b, mode="[A,B]", return_logits=True)` is the ranker's pair forward with
  a on the left: exactly the judge's l_ab. (Its default mode "[A,B]+[B,A]" returns
  l_ab - l_ba instead, via `rank`.)
- `Blender.rank(..., return_scores=True)` (the official SPPO call) computes, per prompt, the full
  matrix C[i, j] = l_ij (diagonal 0) and the scores s_i = mean_j (C - C^T)[i, j], so
  `sppo.preference.bt_scores(L)` must equal s and `bt_probs(L)[i, j]` must equal
  sigmoid(s_i - s_j), the official SPPO preference.
Small length limits make the collator truncate, so the limits are exercised too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.engines.blender_compat import import_llm_blender
from actors.engines.pairrm import DisentangledEncoder, PairRMEngine, resolve_dtype
from sppo.preference import bt_probs, bt_scores
from sppo.tiny_pairrm import ensure_tiny_pairrm

SRC_MAX, CAND_MAX = 24, 16  # tokens; far below PairRM's 1224/412 so that truncation happens

PROMPTS = [
    "what is the sun?",
    "tell me a story about a cat and a dog who live in a small house by the river " * 3,
    "list three fruits",
]
CANDIDATES = [
    ["a star.", "it is a big hot fire in the sky that gives us light every day", "no", "the sun"],
    ["once upon a time", "the cat and the dog were friends " * 6, "a dog", "they slept"],
    ["apple, bread, cake", "apple", "I do not know what a fruit is, sorry", "tea"],
]


@pytest.fixture(scope="module")
def tiny_pairrm(tmp_path_factory):
    return ensure_tiny_pairrm(tmp_path_factory.getbasetemp() / "tiny-pairrm")


@pytest.fixture(scope="module")
def engine(tiny_pairrm):
    # batch_size 5 does not divide the 36 pairs: batches mix prompts and end ragged.
    return PairRMEngine(str(tiny_pairrm.ranker_dir), backbone=str(tiny_pairrm.backbone_dir),
                        batch_size=5, source_max_length=SRC_MAX, candidate_max_length=CAND_MAX)


@pytest.fixture(scope="module")
def blender(tiny_pairrm):
    """llm-blender's official path, loaded independently of the engine."""
    llm_blender = import_llm_blender()
    b = llm_blender.Blender(llm_blender.BlenderConfig(device="cpu", use_tqdm=False))
    b.loadranker(str(tiny_pairrm.ranker_dir), device="cpu",
                 model_name=str(tiny_pairrm.backbone_dir),
                 source_maxlength=SRC_MAX, candidate_maxlength=CAND_MAX)
    return b


@pytest.fixture(scope="module")
def batched(engine):
    return engine.logits(PROMPTS, CANDIDATES)


def test_each_entry_equals_blender_compare(batched, blender):
    for prompt, cands, mat in zip(PROMPTS, CANDIDATES, batched):
        k = len(cands)
        assert mat.shape == (k, k)
        pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
        official = blender.compare([prompt] * len(pairs), [cands[i] for i, _ in pairs],
                                   [cands[j] for _, j in pairs], batch_size=1,
                                   return_logits=True, mode="[A,B]", disable_tqdm=True)
        ours = np.array([mat[i, j] for i, j in pairs])
        np.testing.assert_allclose(ours, official, rtol=1e-5, atol=1e-5)
        assert np.ptp(ours) > 1e-2  # a content-blind model would pass trivially
        assert (np.diag(mat) == 0).all()


def test_bt_probs_equal_official_score_formula(batched, blender):
    scores = blender.rank(PROMPTS, CANDIDATES, return_scores=True, batch_size=1,
                          disable_tqdm=True)  # (N, K), the official SPPO call
    logits = torch.tensor(np.stack(batched), dtype=torch.float64)
    np.testing.assert_allclose(bt_scores(logits).numpy(), scores, rtol=1e-5, atol=1e-5)
    s = torch.tensor(scores, dtype=torch.float64)
    official_p = torch.sigmoid(s[:, :, None] - s[:, None, :])  # P[i][j] = 1/(1+e^(s_j-s_i))
    np.testing.assert_allclose(bt_probs(logits).numpy(), official_p.numpy(), atol=1e-5)


def test_default_compare_mode_is_the_two_order_difference(batched, blender):
    """`compare`'s recommended "[A,B]+[B,A]" mode returns l_ab - l_ba."""
    p, (a, b) = PROMPTS[0], (CANDIDATES[0][0], CANDIDATES[0][1])
    both = blender.compare([p], [a], [b], return_logits=True, disable_tqdm=True)
    np.testing.assert_allclose(both, [batched[0][0, 1] - batched[0][1, 0]], atol=1e-5)


def test_pair_logits_equal_compare(engine, blender):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    a = [CANDIDATES[0][1], CANDIDATES[1][1], CANDIDATES[2][0]]
    b = [CANDIDATES[0][2], CANDIDATES[1][0], CANDIDATES[2][3]]
    official = blender.compare(prompts, a, b, batch_size=1, return_logits=True, mode="[A,B]",
                               disable_tqdm=True)
    np.testing.assert_allclose(engine.pair_logits(prompts, a, b), official, atol=1e-5)


def test_batch_composition_does_not_change_logits(engine, batched):
    """Each prompt alone gives the same matrix as all prompts together (limits are per prompt)."""
    for n, (prompt, cands) in enumerate(zip(PROMPTS, CANDIDATES)):
        alone = engine.logits([prompt], [cands])[0]
        np.testing.assert_allclose(alone, batched[n], atol=1e-5)


def test_length_limits_cut_long_responses(engine):
    """Text past PairRM's candidate limit is never seen: appending to an already over-long
    response does not change any logit."""
    long = "the cat and the dog were friends " * 10
    base = engine.logits([PROMPTS[0]], [[long, "a star."]])[0]
    longer = engine.logits([PROMPTS[0]], [[long + " and then a dragon came", "a star."]])[0]
    np.testing.assert_array_equal(base, longer)


def test_mixed_k_per_prompt(engine, batched):
    mats = engine.logits(PROMPTS[:2], [CANDIDATES[0][:2], CANDIDATES[1]])
    assert [m.shape for m in mats] == [(2, 2), (4, 4)]
    np.testing.assert_allclose(mats[0], batched[0][:2, :2], atol=1e-5)


def test_cpu_runs_in_float32():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_half_precision_close_to_cpu(tiny_pairrm, batched):
    gpu = PairRMEngine(str(tiny_pairrm.ranker_dir), backbone=str(tiny_pairrm.backbone_dir),
                       batch_size=5, source_max_length=SRC_MAX, candidate_max_length=CAND_MAX,
                       device="cuda")
    assert gpu.dtype in (torch.bfloat16, torch.float16)
    mats = gpu.logits(PROMPTS, CANDIDATES)
    for got, want in zip(mats, batched):
        np.testing.assert_allclose(got, want, atol=0.1 * max(1.0, np.abs(want).max()))


# ---------------------------------------------------------------- the packed DeBERTa encoder


def test_pairrm_backbone_takes_the_packed_encoder(engine):
    """The tiny PairRM is DeBERTa-v2 with c2p/p2c attention: the fast path, not the fallback."""
    assert isinstance(engine.encoder, DisentangledEncoder)


def _pairs(engine, n):
    src, cands = engine._encode(PROMPTS[1], CANDIDATES[1])
    seqs = [engine._pack(src, cands[i], cands[j]) for i, j in [(0, 1), (1, 2), (3, 0), (2, 3)]]
    return seqs[:n]


def test_encoder_is_transformers_forward_bit_for_bit(engine):
    """One sequence: exactly transformers' DebertaV2Model output, also when the attention is cut
    into one-head blocks."""
    (ids,) = _pairs(engine, 1)
    model = engine.ranker.pretrained_model
    with torch.inference_mode():
        want = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]
                     ).last_hidden_state[0]
        got = engine.encoder(ids, [len(ids)])
        one_head = DisentangledEncoder(model, block=1)(ids, [len(ids)])
    assert torch.equal(got, want)
    assert torch.equal(one_head, want)


def test_encoder_packs_sequences_without_padding(engine):
    """Sequences of different lengths packed end to end: each as if alone (up to GEMM rounding
    on more rows), and no padding token is ever seen."""
    seqs = _pairs(engine, 4)
    assert len({len(s) for s in seqs}) > 1
    with torch.inference_mode():
        packed = engine.encoder(torch.cat(seqs), [len(s) for s in seqs])
        alone = torch.cat([engine.encoder(s, [len(s)]) for s in seqs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_fallback_through_the_rankers_forward_agrees(tiny_pairrm, batched):
    """A backbone the packed encoder does not cover goes through `CrossCompareReranker._forward`
    on padded batches; same logits."""
    slow = PairRMEngine(str(tiny_pairrm.ranker_dir), backbone=str(tiny_pairrm.backbone_dir),
                        batch_size=5, source_max_length=SRC_MAX, candidate_max_length=CAND_MAX)
    slow.encoder = None
    for got, want in zip(slow.logits(PROMPTS, CANDIDATES), batched):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_prefix_token_inside_a_text_is_an_error(engine):
    """A response containing PairRM's own marker would make llm-blender's head read the wrong
    states (its `reduce` fails on the shape); we refuse it by name."""
    with pytest.raises(ValueError, match="prefix tokens"):
        engine.logits([PROMPTS[0]], [["a <|candidate|> b", "no"]])


def test_bf16_on_cpu_is_an_approximation_within_bounds(tiny_pairrm, batched):
    """`dtype="bfloat16"` (opt-in; the CPU default is float32) trades precision for speed. On
    this random model, whose large weights amplify rounding, it moves logits by up to ~0.25
    (|l| < 3) and direct preference probabilities by up to ~0.03; bounds with some margin."""
    from sppo.preference import pairwise_probs

    fast = PairRMEngine(str(tiny_pairrm.ranker_dir), backbone=str(tiny_pairrm.backbone_dir),
                        batch_size=5, source_max_length=SRC_MAX, candidate_max_length=CAND_MAX,
                        dtype="bfloat16")
    assert fast.dtype == torch.bfloat16
    for got, want in zip(fast.logits(PROMPTS, CANDIDATES), batched):
        assert np.abs(got - want).max() < 0.2 * np.abs(want).max()
        p_got, p_want = (pairwise_probs(torch.tensor(x, dtype=torch.float64)) for x in (got, want))
        assert (p_got - p_want).abs().max() < 0.1
