"""Tests for sppo/preference.py: hand-computed 3x3 cases, properties on random batches, and the
official code's score reduction re-implemented as a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sppo.preference import (
    bt_probs,
    bt_scores,
    check_finite,
    is_degenerate,
    pairwise_probs,
    preference_matrix,
    select_pair,
    win_rates,
)

NAN = float("nan")

# Judge logits for K = 3; the diagonal is never evaluated, NaN shows it is ignored.
L3 = [[NAN, 1.0, 2.0],
      [-1.0, NAN, 0.5],
      [0.0, -2.0, NAN]]


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def random_logits(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 3


def test_pairwise_probs_hand_computed():
    """Direct mode on L3: P[i][j] = (sig(l_ij) + 1 - sig(l_ji)) / 2.

    P01 = (sig(1) + 1 - sig(-1)) / 2 = sig(1)                 = 0.7310585786
    P02 = (sig(2) + 1 - sig(0)) / 2  = (0.8807970780 + 0.5)/2 = 0.6903985390
    P12 = (sig(0.5) + 1 - sig(-2))/2 = (0.6224593312 + 0.8807970780)/2 = 0.7516282046
    P10 = (sig(-1) + 1 - sig(1)) / 2 = 1 - P01, likewise P20, P21; diagonal 1/2 despite NaN.
    """
    p01 = (sig(1) + 1 - sig(-1)) / 2
    p02 = (sig(2) + 1 - sig(0)) / 2
    p12 = (sig(0.5) + 1 - sig(-2)) / 2
    assert p01 == pytest.approx(0.7310585786)
    assert p02 == pytest.approx(0.6903985390)
    assert p12 == pytest.approx(0.7516282046)
    expected = torch.tensor([[0.5, p01, p02],
                             [1 - p01, 0.5, p12],
                             [1 - p02, 1 - p12, 0.5]], dtype=torch.float64)
    got = pairwise_probs(torch.tensor(L3, dtype=torch.float64))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_bt_probs_hand_computed():
    """Official score mode on L3: s_i = (1/K) sum_{j != i} (l_ij - l_ji), P = sig(s_i - s_j).

    l01 - l10 = 1 - (-1) = 2, l02 - l20 = 2 - 0 = 2, l12 - l21 = 0.5 - (-2) = 2.5, so
    s0 = (2 + 2) / 3 = 4/3, s1 = (-2 + 2.5) / 3 = 1/6, s2 = (-2 - 2.5) / 3 = -3/2
    P01 = sig(4/3 - 1/6) = sig(7/6), P02 = sig(4/3 + 3/2) = sig(17/6),
    P12 = sig(1/6 + 3/2) = sig(5/3).
    """
    logits = torch.tensor(L3, dtype=torch.float64)
    torch.testing.assert_close(bt_scores(logits),
                               torch.tensor([4 / 3, 1 / 6, -3 / 2], dtype=torch.float64))
    p01, p02, p12 = sig(7 / 6), sig(17 / 6), sig(5 / 3)
    expected = torch.tensor([[0.5, p01, p02],
                             [1 - p01, 0.5, p12],
                             [1 - p02, 1 - p12, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(bt_probs(logits), expected, rtol=0, atol=1e-12)


def test_win_rates_hand_computed():
    """p_i = (1/K) sum_j P[i][j], diagonal 1/2 included, on the direct P of L3:

    p0 = (0.5 + 0.7310585786 + 0.6903985390) / 3 = 0.6404857059
    p1 = (0.2689414214 + 0.5 + 0.7516282046) / 3 = 0.5068565420
    p2 = (0.3096014610 + 0.2483717954 + 0.5) / 3 = 0.3526577521   (sum 3/2, mean 1/2)
    """
    p = win_rates(pairwise_probs(torch.tensor(L3, dtype=torch.float64)))
    torch.testing.assert_close(
        p, torch.tensor([0.6404857059, 0.5068565420, 0.3526577521], dtype=torch.float64),
        rtol=0, atol=1e-9)


def official_bt_probs_loop(logits: np.ndarray) -> np.ndarray:
    """The official pipeline written out with loops: llm-blender's max_logits scores
    (mean over all K of l_ij - l_ji, diagonal 0) then compute_prob's 1 / (1 + exp(s_j - s_i))."""
    k = logits.shape[0]
    scores = [sum(logits[i][j] - logits[j][i] for j in range(k) if j != i) / k for i in range(k)]
    return np.array([[1 / (1 + math.exp(scores[j] - scores[i])) for j in range(k)]
                     for i in range(k)])


@pytest.mark.parametrize("k", [2, 5])
def test_bt_probs_equals_official_loop(k):
    """bt_probs over a (2, 3, K, K) batch equals the loop reference applied to each matrix."""
    logits = random_logits(2, 3, k, k, seed=k)
    got = bt_probs(logits)
    for a in range(2):
        for b in range(3):
            expected = torch.from_numpy(official_bt_probs_loop(logits[a, b].numpy()))
            torch.testing.assert_close(got[a, b], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["direct", "bt_scores"])
@pytest.mark.parametrize("shape", [(4, 4), (3, 5, 5), (2, 3, 2, 2)])
def test_matrix_properties_on_random_batches(mode, shape):
    """For any logits and either mode: P + P^T = 1, diagonal exactly 1/2, entries in [0, 1],
    win rates of each prompt average to 1/2 (sum_ij P_ij = K^2 / 2), and the batched result
    equals the matrices computed one by one."""
    logits = random_logits(*shape, seed=len(shape))
    p = preference_matrix(logits, mode)
    assert p.shape == logits.shape and p.dtype == torch.float64
    torch.testing.assert_close(p + p.mT, torch.ones_like(p), rtol=0, atol=1e-12)
    diag = torch.diagonal(p, dim1=-2, dim2=-1)
    assert torch.equal(diag, torch.full_like(diag, 0.5))
    assert bool(((p >= 0) & (p <= 1)).all())
    w = win_rates(p)
    assert w.shape == shape[:-1]
    torch.testing.assert_close(w.mean(-1), torch.full(shape[:-2], 0.5, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    flat = logits.reshape(-1, shape[-1], shape[-1])
    one_by_one = torch.stack([preference_matrix(m, mode) for m in flat]).reshape(shape)
    torch.testing.assert_close(p, one_by_one, rtol=0, atol=1e-15)  # SIMD rounding only


@pytest.mark.parametrize("mode", ["direct", "bt_scores"])
def test_diagonal_is_ignored(mode):
    """Whatever sits on the diagonal (0, NaN, +inf) the result is the same, and finite."""
    base = random_logits(4, 4, seed=7)
    results = []
    for fill in (0.0, NAN, math.inf):
        logits = base.clone()
        logits.diagonal().fill_(fill)
        results.append(preference_matrix(logits, mode))
    assert bool(torch.isfinite(results[0]).all())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=0)


def test_direct_mode_is_stable_for_large_logits():
    """l_01 = 40, l_10 = -40: sig(40) + 1 - sig(-40) = 2 - 4e-18, so P01 = 1 - 2e-18 rounds to
    1.0 and P10 = (sig(-40) + sig(-40)) / 2 = sig(-40) = exp(-40) / (1 + exp(-40)) ~ 4.25e-18,
    whereas a naive `1 - sigmoid(l_01)` rounds to 0 and would halve P10."""
    p = pairwise_probs(torch.tensor([[0.0, 40.0], [-40.0, 0.0]], dtype=torch.float64))
    assert float(p[1, 0]) == pytest.approx(math.exp(-40) / (1 + math.exp(-40)), rel=1e-12, abs=0)
    assert float(p[0, 1]) == 1.0


@pytest.mark.parametrize("fn", [pairwise_probs, bt_probs])
def test_input_types_and_dtypes(fn):
    """Lists become the default float dtype; float64 (numpy or torch) stays float64; float32
    stays float32; and the values agree across input types."""
    ref = fn(torch.tensor(L3, dtype=torch.float64))
    from_list = fn(L3)
    assert from_list.dtype == torch.get_default_dtype()
    from_numpy = fn(np.array(L3, dtype=np.float64))
    assert from_numpy.dtype == torch.float64
    assert fn(torch.tensor(L3, dtype=torch.float32)).dtype == torch.float32
    torch.testing.assert_close(from_numpy, ref, rtol=0, atol=0)
    torch.testing.assert_close(from_list.double(), ref, rtol=0, atol=1e-6)
    assert fn([[0, 1], [-1, 0]]).is_floating_point()  # integer lists are accepted


@pytest.mark.parametrize("scores, chosen, rejected", [
    ([0.64, 0.51, 0.35], 0, 2),
    ([0.1, 0.9, 0.5, 0.05], 1, 3),
    ([1.0, 3.0, 3.0, 0.0, 0.0], 1, 3),  # ties: first occurrence for both
    ([2.0, 2.0, 2.0], 0, 0),  # all equal: chosen == rejected
])
def test_select_pair(scores, chosen, rejected):
    """(argmax, argmin) of the last dim, first occurrence on ties."""
    c, r = select_pair(torch.tensor(scores))
    assert (int(c), int(r)) == (chosen, rejected)


def test_select_pair_batched_and_degenerate():
    """Batched scores (2, 3): row 0 -> (1, 2); row 1 all equal -> (0, 0) and degenerate.
    is_degenerate is True exactly where select_pair returns chosen == rejected."""
    scores = torch.tensor([[0.5, 0.7, 0.3], [0.5, 0.5, 0.5]])
    c, r = select_pair(scores)
    assert c.tolist() == [1, 0] and r.tolist() == [2, 0]
    assert c.dtype == torch.int64
    assert is_degenerate(scores).tolist() == [False, True]
    assert torch.equal(is_degenerate(scores), c == r)


def test_is_degenerate_tolerance():
    """max - min = 1e-9: degenerate with atol 1e-6, not with the default exact comparison."""
    scores = torch.tensor([0.5, 0.5 + 1e-9, 0.5], dtype=torch.float64)
    assert not bool(is_degenerate(scores))
    assert bool(is_degenerate(scores, atol=1e-6))


def test_check_finite():
    """None for finite off-diagonal logits (NaN on the diagonal is fine); otherwise a reason
    naming the count out of B*K*(K-1) off-diagonal entries and the first bad index."""
    assert check_finite(L3) is None
    bad = torch.tensor(L3)
    bad[0, 1] = NAN
    bad[2, 1] = math.inf
    reason = check_finite(bad)
    assert reason is not None
    assert "2 of 6" in reason and "(0, 1)" in reason
    batch = torch.zeros(2, 3, 3)
    batch[1, 2, 0] = -math.inf
    reason = check_finite(batch)
    assert "1 of 12" in reason and "(1, 2, 0)" in reason and "-inf" in reason


@pytest.mark.parametrize("fn", [pairwise_probs, bt_probs, bt_scores, win_rates, check_finite])
@pytest.mark.parametrize("shape", [(3, 4), (3,), (2, 0, 0), ()])
def test_bad_matrix_shapes_raise(fn, shape):
    """Non-square, 1-D, empty and scalar inputs are rejected with the expected shape named."""
    with pytest.raises(ValueError, match=r"\(\.\.\., K, K\)"):
        fn(torch.zeros(shape))


@pytest.mark.parametrize("fn", [select_pair, is_degenerate])
@pytest.mark.parametrize("shape", [(), (2, 0)])
def test_bad_score_shapes_raise(fn, shape):
    with pytest.raises(ValueError, match=r"\(\.\.\., K\)"):
        fn(torch.zeros(shape))


def test_preference_matrix_dispatch_and_bad_mode():
    """Each mode name (as in config `judge.preference`) picks its function; others raise."""
    logits = torch.tensor(L3, dtype=torch.float64)
    assert torch.equal(preference_matrix(logits, "direct"), pairwise_probs(logits))
    assert torch.equal(preference_matrix(logits, "bt_scores"), bt_probs(logits))
    assert not torch.allclose(pairwise_probs(logits), bt_probs(logits))
    with pytest.raises(ValueError, match="'direct' or 'bt_scores'.*'bt'"):
        preference_matrix(logits, "bt")
