"""Tests for sppo/loss.py: hand-computed values with their derivations, a token-by-token
reference for sequence_logps, gradient signs, and the dispatcher."""

from __future__ import annotations

import math

import pytest
import torch

from sppo.loss import (
    compute_loss,
    dpo_loss,
    ipo_loss,
    sequence_logps,
    sppo_hard_loss,
    sppo_loss,
    sppo_pair_loss,
)

LN3 = math.log(3.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- sequence_logps

def test_sequence_logps_hand_computed():
    """B = 1, T = 3, V = 2; labels [1, 0, 1]; logits per position [0, 0], [ln 3, 0], [9, -9].

    Logits at t predict the token at t + 1:
      token 1 (label 0) from [0, 0]:     log(1/2)
      token 2 (label 1) from [ln 3, 0]:  log(1 / (3 + 1)) = log(1/4)
    The logits at the last position predict nothing and must not matter.
    mask [0, 1, 1] -> log(1/2) + log(1/4) = -3 ln 2;  mask [0, 0, 1] -> log(1/4) = -2 ln 2.
    """
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [9.0, -9.0]]])
    labels = torch.tensor([[1, 0, 1]])
    both = sequence_logps(logits, labels, torch.tensor([[0, 1, 1]]))
    last = sequence_logps(logits, labels, torch.tensor([[0, 0, 1]]))
    assert both.shape == (1,)
    assert float(both[0]) == pytest.approx(-3 * math.log(2), abs=1e-6)
    assert float(last[0]) == pytest.approx(-2 * math.log(2), abs=1e-6)
    logits[0, 2] = torch.tensor([-50.0, 50.0])
    assert float(sequence_logps(logits, labels, torch.tensor([[0, 1, 1]]))[0]) == \
        pytest.approx(-3 * math.log(2), abs=1e-6)


def manual_logps(logits, labels, mask) -> torch.Tensor:
    """Reference: loop over every token t >= 1, add log_softmax(logits[b, t-1])[labels[b, t]]
    in float64 when mask[b, t] is 1."""
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for step in range(1, logits.shape[1]):
            if mask[b, step]:
                lp = torch.log_softmax(logits[b, step - 1].double(), dim=-1)
                total += float(lp[labels[b, step]])
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def batch_with_prompt_and_padding(dtype=torch.float32):
    """B = 3, T = 7, V = 11. Row 0: prompt 2, response 5. Row 1: prompt 3, response 2, right
    padding 2 (label -100). Row 2: left padding 2 (label 0), prompt 2, response 3."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=g) * 2).to(dtype)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1],
                         [0, 0, 0, 1, 1, 0, 0],
                         [0, 0, 0, 0, 1, 1, 1]])
    labels[1, 5:] = -100
    labels[2, :2] = 0
    return logits, labels, mask


def test_sequence_logps_matches_token_loop():
    """Summed (not averaged) masked log-probs equal the token-by-token reference."""
    logits, labels, mask = batch_with_prompt_and_padding()
    got = sequence_logps(logits, labels, mask)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), manual_logps(logits, labels, mask),
                               rtol=1e-5, atol=1e-5)


def test_sequence_logps_ignores_prompt_and_padding():
    """Changing labels at masked positions, and the logits that predict them (position t - 1
    for a masked t), leaves the result unchanged; changing a response token's label does not."""
    logits, labels, mask = batch_with_prompt_and_padding()
    before = sequence_logps(logits, labels, mask)
    logits2, labels2 = logits.clone(), labels.clone()
    masked = mask == 0
    labels2[masked] = (labels2[masked].clamp(min=0) + 1) % 11
    predicting_masked = torch.zeros_like(masked)
    predicting_masked[:, :-1] = masked[:, 1:]
    logits2[predicting_masked] += 100.0
    torch.testing.assert_close(sequence_logps(logits2, labels2, mask), before, rtol=0, atol=0)
    labels2[0, 3] = (labels2[0, 3] + 1) % 11  # a response token of row 0
    after = sequence_logps(logits2, labels2, mask)
    assert float(after[0]) != float(before[0])
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)


def test_sequence_logps_bf16_computes_in_float32():
    """bf16 logits: the result is float32 and equals the reference on the same bf16 values
    upcast (a bf16 log_softmax would be off by ~1e-2 per token)."""
    logits, labels, mask = batch_with_prompt_and_padding(torch.bfloat16)
    got = sequence_logps(logits, labels, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), manual_logps(logits.float(), labels, mask),
                               rtol=1e-5, atol=1e-5)


def test_sequence_logps_float64_and_gradient():
    """float64 stays float64, and the gradient w.r.t. the logit of a scored token is
    1 - softmax (positive), w.r.t. a logit at a position predicting a masked token 0."""
    logits, labels, mask = batch_with_prompt_and_padding(torch.float64)
    logits.requires_grad_(True)
    out = sequence_logps(logits, labels, mask)
    assert out.dtype == torch.float64
    out.sum().backward()
    # row 0: position 2 predicts token 3 (a response token); position 0 predicts token 1 (prompt)
    label = labels[0, 3]
    expected = 1 - torch.softmax(logits[0, 2].detach(), -1)[label]
    assert float(logits.grad[0, 2, label]) == pytest.approx(float(expected))
    assert torch.count_nonzero(logits.grad[0, 0]) == 0


@pytest.mark.parametrize("logits_shape, labels_shape, mask_shape", [
    ((2, 5), (2, 5), (2, 5)),          # logits not 3-D
    ((2, 5, 3), (2, 4), (2, 5)),       # labels length
    ((2, 5, 3), (2, 5), (1, 5)),       # mask batch
    ((2, 0, 3), (2, 0), (2, 0)),       # empty sequence
])
def test_sequence_logps_bad_shapes(logits_shape, labels_shape, mask_shape):
    with pytest.raises(ValueError, match=r"\(B, T"):
        sequence_logps(torch.zeros(logits_shape), torch.zeros(labels_shape, dtype=torch.long),
                       torch.zeros(mask_shape))


def test_sequence_logps_rejects_mask_on_first_token():
    """Token 0 has no prediction, so a mask covering it is an error, not a silent drop."""
    with pytest.raises(ValueError, match=r"mask\[:, 0\]"):
        sequence_logps(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long),
                       torch.tensor([[1, 1, 1]]))


# ---------------------------------------------------------------- SPPO losses

@pytest.mark.parametrize("policy, ref, p, eta, expected", [
    # log-ratio 1, target 4 * (0.75 - 0.5) = 1 -> 0
    (-5.0, -6.0, 0.75, 4.0, 0.0),
    # log-ratio 1, target 10 * 0.25 = 2.5 -> (1 - 2.5)^2 = 2.25
    (-5.0, -6.0, 0.75, 10.0, 2.25),
    # log-ratio -1, target 10 * (0.25 - 0.5) = -2.5 -> (-1 + 2.5)^2 = 2.25
    (-7.0, -6.0, 0.25, 10.0, 2.25),
    # paper scale at round start: policy = ref, eta = 1000, p = 0.8 -> (0 - 300)^2 = 9e4
    (-40.0, -40.0, 0.8, 1000.0, 9e4),
])
def test_sppo_loss_hand_values(policy, ref, p, eta, expected):
    """((policy - ref) - eta * (p - 1/2))^2, derivation per case in the parameter comments."""
    got = sppo_loss(t(policy), t(ref), t(p), eta)
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(expected)


def test_sppo_loss_batched_and_scalar_win_rate():
    """B = 3 with per-example p, and a python-float p broadcast to the batch:
    log-ratios [1, -1, 0], eta 10, p [0.75, 0.25, 0.5] -> targets [2.5, -2.5, 0]
    -> [2.25, 2.25, 0]; with p = 0.5 for all -> log-ratio^2 = [1, 1, 0]."""
    policy, ref = t(-5, -7, -3), t(-6, -6, -3)
    torch.testing.assert_close(sppo_loss(policy, ref, [0.75, 0.25, 0.5], 10.0),
                               t(2.25, 2.25, 0.0))
    torch.testing.assert_close(sppo_loss(policy, ref, 0.5, 10.0), t(1.0, 1.0, 0.0))


@pytest.mark.parametrize("p, expected_grad", [
    (0.8, -6.0),  # target 10 * 0.3 = 3 above log-ratio 0: d/dx (x - 3)^2 = 2 * (0 - 3) = -6
    (0.2, 6.0),   # target -3 below log-ratio 0: 2 * (0 + 3) = +6
    (0.5, 0.0),   # on target
])
def test_sppo_loss_gradient_sign(p, expected_grad):
    """A log-ratio below its target gives a negative gradient w.r.t. policy_logps (gradient
    descent raises log pi_theta(y|x)); above the target, positive (descent lowers it)."""
    policy = t(-10.0).requires_grad_(True)
    sppo_loss(policy, t(-10.0), t(p), 10.0).sum().backward()
    assert float(policy.grad[0]) == pytest.approx(expected_grad)


def test_sppo_pair_loss_hand_value():
    """pc = -5, rc = -6 -> lr_c = 1; pr = -9, rr = -8 -> lr_r = -1; eta = 10,
    p_c = 0.9 -> target 4, p_r = 0.3 -> target -2:
    ((1 - 4)^2 + (-1 + 2)^2) / 2 = (9 + 1) / 2 = 5."""
    got = sppo_pair_loss(t(-5), t(-9), t(-6), t(-8), t(0.9), t(0.3), 10.0)
    assert float(got[0]) == pytest.approx(5.0)


def test_sppo_hard_loss_hand_value():
    """Same log-ratios as the pair case (1, -1), eta = 10, p = 1 and 0 -> targets 5 and -5:
    ((1 - 5)^2 + (-1 + 5)^2) / 2 = (16 + 16) / 2 = 16; equals the pair loss with p = 1, 0."""
    got = sppo_hard_loss(t(-5), t(-9), t(-6), t(-8), 10.0)
    assert float(got[0]) == pytest.approx(16.0)
    torch.testing.assert_close(got, sppo_pair_loss(t(-5), t(-9), t(-6), t(-8), t(1), t(0), 10.0))


@pytest.mark.parametrize("beta, expected", [
    # margin = (pc - rc) - (pr - rr) = 1 - (-1) = 2
    (0.5, math.log(1 + math.exp(-1))),  # -logsigmoid(0.5 * 2) = log(1 + e^-1) = 0.3132616875
    (0.1, math.log(1 + math.exp(-0.2))),  # -logsigmoid(0.2) = 0.5981388693
])
def test_dpo_loss_hand_values(beta, expected):
    got = dpo_loss(t(-5), t(-9), t(-6), t(-8), beta)
    assert float(got[0]) == pytest.approx(expected)


@pytest.mark.parametrize("beta, expected", [
    (0.25, 0.0),  # margin 2, 1 / (2 * 0.25) = 2 -> (2 - 2)^2 = 0
    (0.5, 1.0),   # 1 / (2 * 0.5) = 1 -> (2 - 1)^2 = 1
    (0.1, 9.0),   # 1 / 0.2 = 5 -> (2 - 5)^2 = 9
])
def test_ipo_loss_hand_values(beta, expected):
    got = ipo_loss(t(-5), t(-9), t(-6), t(-8), beta)
    assert float(got[0]) == pytest.approx(expected)


@pytest.mark.parametrize("fn, args", [
    (sppo_loss, (t(1, 2), t(1, 2).unsqueeze(-1), t(0.5, 0.5), 1.0)),
    (sppo_loss, (t(1, 2), t(1, 2), t(0.5, 0.5, 0.5), 1.0)),
    (sppo_pair_loss, (t(1), t(1, 2), t(1), t(1), t(0.5), t(0.5), 1.0)),
    (dpo_loss, (t(1, 2), t(1, 2), t(1, 2).unsqueeze(-1), t(1, 2), 1.0)),
    (ipo_loss, (t(1, 2), t(1, 2), t(1, 2), t(1), 1.0)),
])
def test_losses_reject_mismatched_shapes(fn, args):
    """(B,) against (B, 1) would broadcast to (B, B) silently; it must raise instead."""
    with pytest.raises(ValueError, match="shape"):
        fn(*args)


@pytest.mark.parametrize("fn, args", [
    (sppo_loss, (t(1), t(1), t(0.5), 0.0)),
    (dpo_loss, (t(1), t(1), t(1), t(1), -1.0)),
    (ipo_loss, (t(1), t(1), t(1), t(1), 0.0)),
])
def test_losses_reject_nonpositive_coefficients(fn, args):
    with pytest.raises(ValueError, match="must be > 0"):
        fn(*args)


# ---------------------------------------------------------------- compute_loss

PAIR = dict(policy_chosen=t(-5, -3), ref_chosen=t(-6, -3), p_chosen=t(0.9, 0.5),
            policy_rejected=t(-9, -4), ref_rejected=t(-8, -2), p_rejected=t(0.3, 0.5))


@pytest.mark.parametrize("name, expected", [
    ("sppo", sppo_pair_loss(t(-5, -3), t(-9, -4), t(-6, -3), t(-8, -2), t(0.9, 0.5),
                            t(0.3, 0.5), 10.0)),
    ("sppo_hard", sppo_hard_loss(t(-5, -3), t(-9, -4), t(-6, -3), t(-8, -2), 10.0)),
    ("dpo", dpo_loss(t(-5, -3), t(-9, -4), t(-6, -3), t(-8, -2), 0.5)),
    ("ipo", ipo_loss(t(-5, -3), t(-9, -4), t(-6, -3), t(-8, -2), 0.5)),
])
def test_compute_loss_dispatches_pairs(name, expected):
    """Each name with a (chosen, rejected) batch equals its function (eta 10, beta 0.5)."""
    loss, _ = compute_loss(name, **PAIR, eta=10.0, beta=0.5)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, expected)


def test_compute_loss_sppo_single_sample():
    """'sppo' without a rejected side is the all-mode single-sample loss:
    lr = [1, 0], eta 10, p = [0.9, 0.5] -> targets [4, 0] -> [(1 - 4)^2, 0] = [9, 0]."""
    loss, stats = compute_loss("sppo", policy_chosen=t(-5, -3), ref_chosen=t(-6, -3),
                               p_chosen=t(0.9, 0.5), eta=10.0, beta=0.1)
    torch.testing.assert_close(loss, t(9.0, 0.0))
    assert set(stats) == {"log_ratio", "log_ratio_chosen", "target", "target_chosen"}
    assert float(stats["log_ratio"]) == pytest.approx(0.5)  # mean(1, 0)
    assert float(stats["target"]) == pytest.approx(2.0)  # mean(4, 0)


def test_compute_loss_stats_pair():
    """PAIR: lr_c = [1, 0], lr_r = [-1, -2]; margins [2, 2]; eta 10 ->
    targets chosen [4, 0] (mean 2), rejected [-2, 0] (mean -1); over all 4 responses:
    log-ratio mean (1 + 0 - 1 - 2) / 4 = -0.5, target mean (4 + 0 - 2 + 0) / 4 = 0.5.
    sppo_hard targets are 10 * (1 - 0.5) = 5 and -5. Stats are detached 0-dim tensors."""
    policy = PAIR["policy_chosen"].clone().requires_grad_(True)
    _, stats = compute_loss("sppo", **{**PAIR, "policy_chosen": policy}, eta=10.0, beta=0.1)
    expected = {"log_ratio": -0.5, "log_ratio_chosen": 0.5, "log_ratio_rejected": -1.5,
                "margin": 2.0, "target": 0.5, "target_chosen": 2.0, "target_rejected": -1.0}
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key].dim() == 0 and not stats[key].requires_grad
        assert float(stats[key]) == pytest.approx(value), key
    _, hard = compute_loss("sppo_hard", **PAIR, eta=10.0, beta=0.1)
    assert float(hard["target_chosen"]) == 5.0 and float(hard["target_rejected"]) == -5.0
    _, dpo = compute_loss("dpo", **PAIR, eta=10.0, beta=0.1)
    assert "target" not in dpo and float(dpo["margin"]) == pytest.approx(2.0)


def test_compute_loss_backpropagates():
    """The per-example loss carries the graph to the policy log-probs (and not to stats)."""
    policy = PAIR["policy_chosen"].clone().requires_grad_(True)
    loss, _ = compute_loss("sppo", **{**PAIR, "policy_chosen": policy}, eta=10.0, beta=0.1)
    loss.sum().backward()
    # d/dx of ((x - rc) - t)^2 / 2 = (lr_c - t) = [1 - 4, 0 - 0] = [-3, 0]
    torch.testing.assert_close(policy.grad, t(-3.0, 0.0))


@pytest.mark.parametrize("name, kwargs, match", [
    ("kto", PAIR, "one of sppo, sppo_hard, dpo, ipo"),
    ("dpo", dict(policy_chosen=t(1), ref_chosen=t(1), p_chosen=None), "needs a rejected"),
    ("sppo", {**PAIR, "p_rejected": None}, "needs p_chosen"),
    ("sppo", {**PAIR, "ref_rejected": None}, "together"),
    ("sppo", dict(policy_chosen=t(1), ref_chosen=t(1), p_chosen=t(0.5), p_rejected=t(0.5)),
     "p_rejected given"),
])
def test_compute_loss_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_loss(name, **kwargs, eta=10.0, beta=0.1)
