"""Tests of sppo/evaluate.py on hand-computed matrices."""

import math

import pytest
import torch

from sppo.evaluate import cross_win_rate, merge_for_eval, summarize
from sppo.preference import pairwise_probs
from sppo.records import Generation, Prompt


def _gen(pid, texts, version=0):
    p = Prompt(id=pid, text="q", token_ids=(1, 2))
    return Generation(prompt=p, response_ids=[[i] for i in range(len(texts))], texts=list(texts),
                      finish_reasons=["stop"] * len(texts), weight_version=version)


def test_cross_win_rate_takes_only_the_cross_block():
    """K=2 current (rows 0,1) vs 2 baseline (rows 2,3). Cross block entries:
    P[0][2]=0.9, P[0][3]=0.7, P[1][2]=0.6, P[1][3]=0.2 -> mean (0.9+0.7+0.6+0.2)/4 = 0.6.
    Within-group entries (0.99, 0.01) must not count."""
    P = [[0.5, 0.99, 0.9, 0.7],
         [0.01, 0.5, 0.6, 0.2],
         [0.1, 0.4, 0.5, 0.99],
         [0.3, 0.8, 0.01, 0.5]]
    assert cross_win_rate(P, 2) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        cross_win_rate(P, 4)


def test_cross_win_rate_of_equal_policies_is_half_under_pairwise_probs():
    """With pairwise_probs, P + P^T = 1, so a group judged against an exact copy of itself
    (same logits structure, mirrored) has cross win rate 1/2."""
    l = torch.randn(3, 3)
    full = torch.zeros(6, 6)
    full[:3, :3] = l
    full[3:, 3:] = l
    full[:3, 3:] = l
    full[3:, :3] = l
    P = pairwise_probs(full).tolist()
    assert cross_win_rate(P, 3) == pytest.approx(0.5)


def test_summarize_mean_and_ci():
    """Values 0.4, 0.6, 0.8: mean 0.6, sample sd 0.2, half-width 1.96*0.2/sqrt(3)."""
    wr = summarize([0.4, 0.6, 0.8])
    half = 1.96 * 0.2 / math.sqrt(3)
    assert wr.mean == pytest.approx(0.6)
    assert wr.ci_low == pytest.approx(0.6 - half) and wr.ci_high == pytest.approx(0.6 + half)
    assert wr.n == 3
    assert summarize([]) is None
    assert summarize([0.7]).ci_low == 0.0


def test_merge_for_eval_orders_current_first_and_checks_ids():
    cur, base = _gen("a", ["x", "y"], version=3), _gen("a", ["u", "v"])
    m = merge_for_eval(cur, base)
    assert m.texts == ["x", "y", "u", "v"] and m.k == 4 and m.weight_version == 3
    with pytest.raises(ValueError, match="prompt ids differ"):
        merge_for_eval(cur, _gen("b", ["u", "v"]))
