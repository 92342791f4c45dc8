"""Preference maths: judge logits -> preference matrix -> win rates -> (chosen, rejected).

For one prompt with K responses the judge returns a (K, K) logit matrix, `logits[i, j]` being
its logit that response i beats response j with i shown first (the diagonal is never evaluated
and is ignored here, so it may hold anything, NaN included). Two reductions to a preference
matrix P (P[i, j] = P(y_i beats y_j), P + P^T = 1, diagonal 1/2):

- `direct` (default): average the two presentation orders of each pair,
  `P[i, j] = (sigmoid(l_ij) + 1 - sigmoid(l_ji)) / 2`.
- `bt_scores` (parity with the official SPPO code, which takes llm-blender's scores): a
  Bradley-Terry reduction, `s_i = (1/K) * sum_{j != i} (l_ij - l_ji)`, `P[i, j] = sigmoid(s_i - s_j)`.

The win rate `p_i = (1/K) * sum_j P[i, j]` (j = i included) is SPPO's estimate of
P(y_i beats pi_t | x).

Every function takes torch tensors (numpy arrays and nested lists go through `torch.as_tensor`;
float64 stays float64, integers become the default float dtype) with any leading batch dims,
`(..., K, K)` or `(..., K)`, and returns torch tensors. Deliberately left out: calling the judge,
batching pairs, and anything that needs Ray.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

__all__ = [
    "pairwise_probs",
    "bt_scores",
    "bt_probs",
    "win_rates",
    "select_pair",
    "is_degenerate",
    "preference_matrix",
    "check_finite",
]

PreferenceMode = Literal["direct", "bt_scores"]


def _as_float(x) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _as_square(x, what: str = "logits") -> torch.Tensor:
    """`x` as a floating tensor of shape (..., K, K), K >= 1, else ValueError."""
    t = _as_float(x)
    if t.dim() < 2 or t.shape[-1] != t.shape[-2] or t.shape[-1] == 0:
        raise ValueError(f"{what} must have shape (..., K, K) with K >= 1, got {tuple(t.shape)}")
    return t


def _as_scores(x, what: str = "scores") -> torch.Tensor:
    """`x` as a floating tensor of shape (..., K), K >= 1, else ValueError."""
    t = _as_float(x)
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"{what} must have shape (..., K) with K >= 1, got {tuple(t.shape)}")
    return t


def _eye(t: torch.Tensor) -> torch.Tensor:
    """Boolean (K, K) identity for a (..., K, K) tensor (broadcasts over batch dims)."""
    k = t.shape[-1]
    return torch.eye(k, dtype=torch.bool, device=t.device)


def pairwise_probs(logits) -> torch.Tensor:
    """Direct preference matrix from both presentation orders.

    `P[i, j] = (sigmoid(l_ij) + 1 - sigmoid(l_ji)) / 2` for i != j and `P[i, i] = 1/2` exactly,
    so P + P^T = 1 (up to rounding). `1 - sigmoid(l_ji)` is computed as `sigmoid(-l_ji)`, which
    does not lose precision for large logits.

    logits: (..., K, K), diagonal ignored. Returns P: (..., K, K), same dtype.
    """
    l = _as_square(logits)
    p = (torch.sigmoid(l) + torch.sigmoid(-l.mT)) / 2
    return torch.where(_eye(l), torch.full_like(p, 0.5), p)


def bt_scores(logits) -> torch.Tensor:
    """Bradley-Terry scores of the official SPPO code (llm-blender's `max_logits` scores).

    `s_i = (1/K) * sum_{j != i} (l_ij - l_ji)`: a mean over all K columns with the diagonal
    contributing 0 (llm-blender computes `(C - C^T).mean(-1)`, whose diagonal is 0).

    logits: (..., K, K), diagonal ignored. Returns s: (..., K).
    """
    l = _as_square(logits)
    diff = torch.where(_eye(l), torch.zeros_like(l), l - l.mT)  # NaN/inf diagonal can't leak
    return diff.mean(dim=-1)


def bt_probs(logits) -> torch.Tensor:
    """Preference matrix of the `bt_scores` parity mode: `P[i, j] = sigmoid(s_i - s_j)`.

    s is `bt_scores(logits)`; the diagonal is sigmoid(0) = 1/2 exactly.

    logits: (..., K, K), diagonal ignored. Returns P: (..., K, K).
    """
    s = bt_scores(logits)
    return torch.sigmoid(s.unsqueeze(-1) - s.unsqueeze(-2))


def win_rates(probs) -> torch.Tensor:
    """SPPO win rates `p_i = (1/K) * sum_j P[i, j]`, the diagonal (1/2) included.

    For a P with P + P^T = 1 the K win rates of a prompt average to exactly 1/2.

    probs: (..., K, K). Returns p: (..., K).
    """
    return _as_square(probs, "probs").mean(dim=-1)


def select_pair(scores) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) = (argmax, argmin) of `scores` along the last dim.

    Ties go to the first occurrence for both (torch's documented argmax/argmin behaviour, and
    numpy's, which the official code uses). If all K scores are equal, chosen == rejected == 0:
    callers should test `is_degenerate(scores)` first and skip such prompts ("all K responses
    scored equal"). NaN scores give meaningless indices: run `check_finite` on the logits first.

    scores: (..., K), e.g. win rates or `bt_scores`. Returns two int64 tensors of shape (...)
    (0-dim for a single prompt; use `int(...)`).
    """
    s = _as_scores(scores)
    return s.argmax(dim=-1), s.argmin(dim=-1)


def is_degenerate(scores, atol: float = 0.0) -> torch.Tensor:
    """True where all K scores are equal (max - min <= atol), i.e. no pair can be chosen.

    With the default atol = 0 this is exactly the case in which `select_pair` returns
    chosen == rejected. Rows holding NaN are not reported here (see `check_finite`).

    scores: (..., K). Returns a bool tensor of shape (...).
    """
    s = _as_scores(scores)
    return (s.amax(dim=-1) - s.amin(dim=-1)) <= atol


def preference_matrix(logits, mode: PreferenceMode = "direct") -> torch.Tensor:
    """P from judge logits by the configured reduction (`judge.preference`).

    mode: "direct" -> `pairwise_probs`, "bt_scores" -> `bt_probs`.
    logits: (..., K, K). Returns P: (..., K, K).
    """
    if mode == "direct":
        return pairwise_probs(logits)
    if mode == "bt_scores":
        return bt_probs(logits)
    raise ValueError(f"preference mode must be 'direct' or 'bt_scores', got {mode!r}")


def check_finite(logits) -> Optional[str]:
    """A reason string if any off-diagonal logit is NaN or +-inf, else None.

    The diagonal is ignored (never evaluated by the judge). The reason names how many entries
    are bad and the index of the first, e.g.
    "judge logits not finite: 2 of 6 off-diagonal entries are NaN/inf (first at (0, 1): nan)".

    logits: (..., K, K).
    """
    l = _as_square(logits)
    bad = ~torch.isfinite(l) & ~_eye(l)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    k = l.shape[-1]
    n_off = (l.numel() // (k * k)) * k * (k - 1)
    first = tuple(int(i) for i in bad.nonzero()[0])
    return (f"judge logits not finite: {n_bad} of {n_off} off-diagonal entries are NaN/inf "
            f"(first at {first}: {float(l[first])})")
