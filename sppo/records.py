"""The records that flow between stages: prompts -> generations -> annotated -> training rows.

Plain dataclasses of Python lists and numbers (cheap to pickle through Ray's object store, no
torch tensors). Every prompt of a round ends as exactly one `Annotated` or one `Failed`; the
pipeline counts both, so nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Prompt", "Generation", "Annotated", "Failed", "TrainRow"]


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
