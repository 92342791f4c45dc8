"""Per-round evaluation: win rate of pi_t against pi_0 on held-out prompts, under the judge.

For each held-out prompt, K responses of pi_t and K of pi_0 (same sampling settings) are put in
one 2K-response group and judged like any training prompt, so both orders of every pair are
evaluated (`sppo.preference.pairwise_probs`). The prompt's score is the mean of the cross block
`P[i][K + j]` (pi_t's response i against pi_0's response j); the round's win rate is the mean
over prompts with a normal-approximation 95% confidence interval across prompts (prompts are
the independent units; responses of one prompt are not).

The same applies against dataset reference responses when the prompts carry one (`against`
then has one response per prompt).

`plot_progress` draws a run's win rate and mean loss per round (`progress.png`) from its round
reports.

Not here: running the pools (the driver does that); this module is maths and bookkeeping.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from sppo.records import Generation

__all__ = ["WinRate", "merge_for_eval", "cross_win_rate", "summarize", "plot_progress"]


@dataclass(frozen=True)
class WinRate:
    mean: float
    ci_low: float
    ci_high: float
    n: int  # prompts

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f}% [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}] (n={self.n})"


def merge_for_eval(current: Generation, baseline: Generation) -> Generation:
    """One group holding the current policy's responses first, then the baseline's."""
    if current.prompt.id != baseline.prompt.id:
        raise ValueError(f"prompt ids differ: {current.prompt.id!r} vs {baseline.prompt.id!r}")
    return Generation(
        prompt=current.prompt,
        response_ids=list(current.response_ids) + list(baseline.response_ids),
        texts=list(current.texts) + list(baseline.texts),
        finish_reasons=list(current.finish_reasons) + list(baseline.finish_reasons),
        logprobs=None,
        weight_version=current.weight_version,
    )


def cross_win_rate(probs: Sequence[Sequence[float]], k: int) -> float:
    """Mean of P[i][k + j] over i < k, j >= k: how often the first k beat the rest."""
    n = len(probs)
    if not 0 < k < n:
        raise ValueError(f"need 0 < k < {n} (got k={k})")
    vals = [probs[i][j] for i in range(k) for j in range(k, n)]
    return sum(vals) / len(vals)


def summarize(per_prompt: Sequence[float], z: float = 1.96) -> Optional[WinRate]:
    """Mean and normal-approximation CI of per-prompt win rates; None when empty."""
    n = len(per_prompt)
    if n == 0:
        return None
    mean = sum(per_prompt) / n
    if n == 1:
        return WinRate(mean, 0.0, 1.0, 1)
    var = sum((x - mean) ** 2 for x in per_prompt) / (n - 1)
    half = z * math.sqrt(var / n)
    return WinRate(mean, max(0.0, mean - half), min(1.0, mean + half), n)


def plot_progress(run_dir: Path) -> None:
    """`<run_dir>/progress.png`: win rate against round 0 (with its 95% interval) and mean
    SPPO loss per round, from `<run_dir>/rounds/round-<t>.json`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = sorted((json.loads(p.read_text()) for p in
                      (Path(run_dir) / "rounds").glob("round-*.json")),
                     key=lambda r: r["round"])
    xs = [r["round"] + 1 for r in reports]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    wins = [r["win_rate_vs_round0"] for r in reports]
    if any(wins):
        pts = [(x, w) for x, w in zip(xs, wins) if w]
        a.errorbar([x for x, _ in pts], [100 * w["mean"] for _, w in pts],
                   yerr=[[100 * (w["mean"] - w["ci_low"]) for _, w in pts],
                         [100 * (w["ci_high"] - w["mean"]) for _, w in pts]],
                   marker="o", capsize=4)
    a.axhline(50, color="grey", ls="--")
    a.set(title="win rate vs round 0 (%)", xlabel="round", xticks=xs)
    b.plot(xs, [r["mean_loss"] for r in reports], marker="o")
    b.set(title="mean SPPO loss", xlabel="round", xticks=xs)
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "progress.png", dpi=90)
    plt.close(fig)
