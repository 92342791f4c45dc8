"""Losses: sequence log-probabilities, the SPPO objective, and its baselines (sppo_hard, DPO, IPO).

SPPO (Wu et al. 2024) regresses each response's log-ratio against the round-start policy onto
its centred win rate:

    loss(x, y, p) = ( [log pi_theta(y|x) - log pi_t(y|x)] - eta * (p - 1/2) )^2

with log-probabilities summed over response tokens and eta = 1/beta of the paper (1000 there,
so losses around 1e5 at the start are normal). All losses here are unreduced, one value per
example, shape (B,): how to average over micro-batches and ranks is the trainer's decision.
Deliberately left out: model forwards, batching and padding of token ids, and anything that
needs Ray.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "sequence_logps",
    "sppo_loss",
    "sppo_pair_loss",
    "sppo_hard_loss",
    "dpo_loss",
    "ipo_loss",
    "compute_loss",
]

LOSSES = ("sppo", "sppo_hard", "dpo", "ipo")

Probs = Union[torch.Tensor, Sequence[float], float]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the masked tokens of each sequence.

    logits: (B, T, V), a causal LM's output over the full sequence (prompt + response + padding).
    labels: (B, T) int, the same sequence's token ids.
    mask:   (B, T), 1 (or True) on response tokens, 0 on prompt and padding tokens.

    Causal shift, done here: the logits at position t predict the token at t + 1, so

        out[b] = sum_{t=1}^{T-1} mask[b, t] * log_softmax(logits[b, t-1])[labels[b, t]]

    The token at position 0 has no prediction, so `mask[:, 0]` must be 0 (ValueError
    otherwise): a response always follows a non-empty prompt. Labels at masked-out positions
    are never read (they may be -100 or any pad id).

    Computed in float32 (float64 if the logits are float64) one sequence at a time, as
    `logit[label] - logsumexp(logits)`, so the full (B, T, V) float32 copy of bf16 logits is
    never materialised at once outside autograd. Returns (B,) float32/float64, differentiable.
    """
    if logits.dim() != 3 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (B, T, V) with T >= 1, got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must both "
                         f"have shape (B, T) = {tuple(logits.shape[:2])} matching the logits")
    mask = mask.bool()
    if bool(mask[:, 0].any()):
        raise ValueError("mask[:, 0] must be 0: the first token has no prediction "
                         "(the response must follow a non-empty prompt)")
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    target_mask = mask[:, 1:]  # (B, T-1)
    targets = labels[:, 1:].masked_fill(~target_mask, 0).long()  # (B, T-1), safe to gather
    out = []
    for b in range(logits.shape[0]):
        row = logits[b, :-1].to(compute_dtype)  # (T-1, V)
        token_logits = row.gather(-1, targets[b].unsqueeze(-1)).squeeze(-1)  # (T-1,)
        token_logps = token_logits - torch.logsumexp(row, dim=-1)  # (T-1,)
        out.append((token_logps * target_mask[b]).sum())
    if not out:
        return logits.new_zeros(0, dtype=compute_dtype)
    return torch.stack(out)


def _like(p: Probs, ref: torch.Tensor, name: str) -> torch.Tensor:
    """`p` as a tensor with `ref`'s dtype, device and shape (a scalar broadcasts)."""
    t = torch.as_tensor(p, dtype=ref.dtype, device=ref.device)
    if t.dim() == 0:
        return t.expand_as(ref)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
    return t


def _check_same_shape(**tensors: torch.Tensor) -> None:
    # Catches (B,) vs (B, 1), which would silently broadcast to (B, B).
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"log-prob tensors must all have the same shape (B,), got {shapes}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def sppo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, win_rates: Probs,
              eta: float) -> torch.Tensor:
    """SPPO's squared loss for single samples (the paper's Algorithm 1, selection `all`).

    `((policy_logps - ref_logps) - eta * (win_rates - 1/2)) ** 2`

    policy_logps, ref_logps: (B,) summed response log-probs under pi_theta and pi_t.
    win_rates: (B,) (or a scalar) p in [0, 1]. Returns (B,), unreduced.
    """
    _check_positive("eta", eta)
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
    p = _like(win_rates, policy_logps, "win_rates")
    return ((policy_logps - ref_logps) - eta * (p - 0.5)) ** 2


def sppo_pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                   ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                   p_chosen: Probs, p_rejected: Probs, eta: float) -> torch.Tensor:
    """SPPO over a (chosen, rejected) pair (selection `pair`, the official default).

    `( (lr_c - eta * (p_c - 1/2)) ** 2 + (lr_r - eta * (p_r - 1/2)) ** 2 ) / 2`
    with lr = policy - ref; each response is regressed onto its own win rate.

    All tensors (B,); p_chosen, p_rejected: (B,) or scalars. Returns (B,), unreduced.
    """
    _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                      ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    return (sppo_loss(policy_chosen, ref_chosen, p_chosen, eta)
            + sppo_loss(policy_rejected, ref_rejected, p_rejected, eta)) / 2


def sppo_hard_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                   ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                   eta: float) -> torch.Tensor:
    """`sppo_pair_loss` with hard labels p_chosen = 1, p_rejected = 0.

    `( (lr_c - eta/2) ** 2 + (lr_r + eta/2) ** 2 ) / 2`. All tensors (B,). Returns (B,).
    """
    return sppo_pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                          1.0, 0.0, eta)


def _margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                      ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): `-logsigmoid(beta * ((pc - rc) - (pr - rr)))`.

    All tensors (B,). Returns (B,), unreduced.
    """
    _check_positive("beta", beta)
    return -F.logsigmoid(beta * _margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): `((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2`.

    Uses summed log-probs, like the official SPPO/DPO trainers. All tensors (B,). Returns (B,).
    """
    _check_positive("beta", beta)
    margin = _margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (margin - 1 / (2 * beta)) ** 2


def compute_loss(
    name: str,
    *,
    policy_chosen: torch.Tensor,
    ref_chosen: torch.Tensor,
    p_chosen: Optional[Probs],
    policy_rejected: Optional[torch.Tensor] = None,
    ref_rejected: Optional[torch.Tensor] = None,
    p_rejected: Optional[Probs] = None,
    eta: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The trainer's one entry point: the per-example loss (B,) and detached statistics.

    name (`trainer.loss`):
    - "sppo": `sppo_pair_loss` when the rejected side is given (selection `pair`), else
      `sppo_loss` on the chosen side alone (selection `all`: every response is a "chosen").
    - "sppo_hard", "dpo", "ipo": pairwise only; need policy_rejected and ref_rejected, and
      ignore p_chosen / p_rejected (which may be None).

    stats: 0-dim detached float tensors (no host sync; call `.item()` when logging), means over
    the batch:
    - "log_ratio": policy - ref over every response in the batch (chosen and rejected);
      "log_ratio_chosen", and with a rejected side "log_ratio_rejected" and
      "margin" = (pc - rc) - (pr - rr).
    - sppo and sppo_hard only: "target" = eta * (p - 1/2) over every response, "target_chosen",
      and with a rejected side "target_rejected".
    """
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {name!r}")
    pair = policy_rejected is not None
    if pair != (ref_rejected is not None):
        raise ValueError("policy_rejected and ref_rejected must be given together")
    if name != "sppo" and not pair:
        raise ValueError(f"loss {name!r} needs a rejected response (selection 'pair')")

    if name == "sppo":
        if p_chosen is None or (pair and p_rejected is None):
            raise ValueError("loss 'sppo' needs p_chosen (and p_rejected with a rejected side)")
        if not pair and p_rejected is not None:
            raise ValueError("p_rejected given without policy_rejected / ref_rejected")
    if name == "sppo_hard":
        p_chosen, p_rejected = 1.0, 0.0

    if name == "sppo" and not pair:
        loss = sppo_loss(policy_chosen, ref_chosen, p_chosen, eta)
    elif name == "sppo":
        loss = sppo_pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                              p_chosen, p_rejected, eta)
    elif name == "sppo_hard":
        loss = sppo_hard_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, eta)
    elif name == "dpo":
        loss = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    else:
        loss = ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)

    with torch.no_grad():
        lr_c = (policy_chosen - ref_chosen).float()
        stats = {"log_ratio_chosen": lr_c.mean()}
        ratios = [lr_c]
        if pair:
            lr_r = (policy_rejected - ref_rejected).float()
            stats["log_ratio_rejected"] = lr_r.mean()
            stats["margin"] = (lr_c - lr_r).mean()
            ratios.append(lr_r)
        stats["log_ratio"] = torch.cat(ratios).mean()
        if name in ("sppo", "sppo_hard"):
            t_c = eta * (_like(p_chosen, lr_c, "p_chosen") - 0.5)
            stats["target_chosen"] = t_c.mean()
            targets = [t_c]
            if pair:
                t_r = eta * (_like(p_rejected, lr_c, "p_rejected") - 0.5)
                stats["target_rejected"] = t_r.mean()
                targets.append(t_r)
            stats["target"] = torch.cat(targets).mean()
    return loss, {k: v.detach() for k, v in stats.items()}
