"""The records that flow between stages: prompts -> generations -> annotated -> training rows.

Plain dataclasses of Python lists and numbers (cheap to pickle through Ray's object store, no
torch tensors). Every prompt of a round ends as exactly one `Annotated` or one `Failed`; the
pipeline counts both, so nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Prompt", "Generation", "Annotated", "Failed", "TrainRow", "RoundOutcome"]


@dataclass(frozen=True)
class Prompt:
    """One prompt, already rendered with the chat template and tokenized."""

    id: str  # stable across runs: the dataset id column, or "row-<index>"
    text: str  # the rendered prompt (chat template applied)
    token_ids: tuple[int, ...]
    raw: str = ""  # the user's prompt before templating (for display and judges)
    reference: Optional[str] = None  # a reference response from the dataset, if any


@dataclass
class Generation:
    """K sampled responses for one prompt."""

    prompt: Prompt
    response_ids: list[list[int]]  # K lists of token ids (no prompt, no padding)
    texts: list[str]  # K decoded responses (special tokens skipped)
    finish_reasons: list[str]  # "stop" (EOS) or "length" (max_new_tokens)
    # Summed log-prob of each response's sampled tokens under the unmodified model
    # distribution (temperature 1, no top-p), or None when not requested.
    logprobs: Optional[list[float]] = None
    weight_version: int = 0

    @property
    def k(self) -> int:
        return len(self.response_ids)


@dataclass
class Annotated:
    """A generation plus the judge's verdict."""

    generation: Generation
    logits: list[list[float]]  # (K, K): logits[i][j] = judge logit that i beats j, i shown first
    probs: list[list[float]]  # (K, K): P[i][j], P + P^T = 1, diagonal 1/2
    win_rates: list[float]  # (K,): p_i = mean_j P[i][j]

    @property
    def prompt(self) -> Prompt:
        return self.generation.prompt


@dataclass(frozen=True)
class Failed:
    """A prompt that could not be completed, with the stage and reason."""

    prompt_id: str
    stage: str  # "data" | "generate" | "judge" | "train"
    reason: str


@dataclass
class TrainRow:
    """One training example for the trainer: a (prompt, response) with its SPPO target.

    In `pair` selection a row carries both the chosen and the rejected response (the losses
    need them together); in `all` selection `rejected_ids` is empty.
    """

    prompt_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_p: float  # win rate of the chosen (or only) response
    rejected_ids: list[int] = field(default_factory=list)
    rejected_p: float = 0.0
    # Generator's sampled-token log-probs, for trainer.reference = "sampled".
    chosen_ref_logp: Optional[float] = None
    rejected_ref_logp: Optional[float] = None

    @property
    def is_pair(self) -> bool:
        return bool(self.rejected_ids)

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids) \
            if self.is_pair else len(self.prompt_ids) + len(self.chosen_ids)


@dataclass
class RoundOutcome:
    """What became of a round's prompts: every one annotated (its rows went to the trainer) or
    failed with its stage and reason; plus the stages' busy time, for the throughput report and
    the bench (`cluster.pipeline` fills it; a journal's part of a round too, `sppo.resume`)."""

    prompts: int = 0
    annotated: int = 0
    rows: int = 0
    failed: list[Failed] = field(default_factory=list)
    generated: int = 0
    response_tokens: int = 0
    wall_s: float = 0.0
    generate_busy_s: float = 0.0
    judge_busy_s: float = 0.0
    sink_busy_s: float = 0.0
    # Prompts taken from the round's journal (rows to the trainer, nothing generated or judged)
    # and, in a round resumed from a journal, those generated and judged again.
    from_journal: int = 0
    redone: int = 0

    def failed_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.failed:
            key = f"{f.stage}: {f.reason.split(':')[0]}"
            out[key] = out.get(key, 0) + 1
        return out

    def merge(self, other: "RoundOutcome", *, redone: int = 0) -> "RoundOutcome":
        """This outcome (the journal's part of a round) followed by `other` (the pipeline's):
        counts add up, the stage times are the pipeline's."""
        return RoundOutcome(
            prompts=self.prompts + other.prompts, annotated=self.annotated + other.annotated,
            rows=self.rows + other.rows, failed=self.failed + other.failed,
            generated=other.generated, response_tokens=other.response_tokens,
            wall_s=self.wall_s + other.wall_s, generate_busy_s=other.generate_busy_s,
            judge_busy_s=other.judge_busy_s, sink_busy_s=self.wall_s + other.sink_busy_s,
            from_journal=self.from_journal + other.from_journal, redone=redone)

    def summary(self) -> dict:
        return {
            "prompts": self.prompts, "annotated": self.annotated, "failed": len(self.failed),
            "rows": self.rows, "generated": self.generated,
            "response_tokens": self.response_tokens, "wall_s": round(self.wall_s, 3),
            "generate_busy_s": round(self.generate_busy_s, 3),
            "judge_busy_s": round(self.judge_busy_s, 3),
            "sink_busy_s": round(self.sink_busy_s, 3),
            "failed_by_reason": self.failed_by_reason(),
            "from_journal": self.from_journal, "redone": self.redone,
        }
