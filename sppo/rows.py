"""Training rows: `Annotated` records -> `TrainRow`s, length fitting, and padded batches.

Three steps between the judge and the trainer's forward pass, all plain Python/torch:

1. `rows_from_annotated`: one annotated prompt (K responses, K win rates) becomes its training
   rows per selection mode. `pair` (official default): chosen = the response with the highest
   win rate, rejected = the lowest (ties go to the lowest index, as `np.argmax` does in the
   official code; when all K win rates are equal both are response 0 and the SPPO targets are
   0). `all` (the paper's Algorithm 1): K rows, one per response, each with its own p.
2. `fit_row`: make a row fit `max_length` tokens (prompt + response, each side separately) by
   cutting the end of the response, or say why it must be dropped. With sampled-token reference
   log-probs a cut response no longer matches its reference, so such rows are dropped instead.
3. `deal_to_ranks` + `collate`: a global batch is sorted by length and dealt round-robin, so
   each rank gets the same number of rows and neighbouring rows (one micro-batch) have similar
   lengths (length-bucketed padding); `collate` right-pads one micro-batch into tensors with a
   response-only loss mask.

Not here: anything about Ray, the model, or the losses (`sppo.loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, Sequence

import torch

from sppo.records import Annotated, TrainRow

__all__ = ["Batch", "rows_from_annotated", "rows_per_prompt", "fit_row", "deal_to_ranks",
           "micro_batches", "token_micro_batches", "padded_tokens", "collate"]

TRUNCATED = "truncated"


def _first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _first_argmin(values: Sequence[float]) -> int:
    return min(range(len(values)), key=lambda i: (values[i], i))


def rows_per_prompt(selection: Literal["pair", "all"], k: int) -> int:
    """Training rows one annotated prompt gives (`rows_from_annotated`): one pair, or all K."""
    if selection == "pair":
        return 1
    if selection == "all":
        return k
    raise ValueError(f"selection must be 'pair' or 'all', got {selection!r}")


def rows_from_annotated(item: Annotated, selection: Literal["pair", "all"]) -> list[TrainRow]:
    """The training rows of one annotated prompt (see the module docstring for the rules).

    Sampled-token log-probs from the generator, when present, become the rows' reference
    log-probs (used by `trainer.reference = "sampled"`).
    """
    gen = item.generation
    p = item.win_rates
    if len(p) != gen.k:
        raise ValueError(f"prompt {gen.prompt.id!r}: {len(p)} win rates for {gen.k} responses")
    logps = gen.logprobs
    prompt_ids = list(gen.prompt.token_ids)
    if selection == "pair":
        c, r = _first_argmax(p), _first_argmin(p)
        return [TrainRow(
            prompt_id=gen.prompt.id, prompt_ids=prompt_ids,
            chosen_ids=list(gen.response_ids[c]), chosen_p=float(p[c]),
            rejected_ids=list(gen.response_ids[r]), rejected_p=float(p[r]),
            chosen_ref_logp=None if logps is None else float(logps[c]),
            rejected_ref_logp=None if logps is None else float(logps[r]),
        )]
    if selection == "all":
        return [TrainRow(
            prompt_id=gen.prompt.id, prompt_ids=prompt_ids,
            chosen_ids=list(gen.response_ids[i]), chosen_p=float(p[i]),
            chosen_ref_logp=None if logps is None else float(logps[i]),
        ) for i in range(gen.k)]
    raise ValueError(f"selection must be 'pair' or 'all', got {selection!r}")


def fit_row(row: TrainRow, max_length: int, *, cut_ok: bool,
            pair: bool) -> tuple[Optional[TrainRow], Optional[str]]:
    """Fit `row` into `max_length` tokens per sequence (prompt + one response).

    `pair` says whether this round's rows must carry a rejected response. Returns
    `(row, None)` when it fits as is, `(cut_row, "truncated")` when responses were cut to fit,
    or `(None, reason)` when it must be dropped: `empty_prompt` (the first token has no
    prediction, so a response needs a prompt before it), `empty_response`, `not_a_pair` /
    `unexpected_pair` (the row does not match the round's selection mode), `prompt_too_long`
    (no room left for a response token), `too_long_for_sampled_reference` (`cut_ok` False).
    """
    if not row.prompt_ids:
        return None, "empty_prompt"
    if not row.chosen_ids:
        return None, "empty_response"
    if pair != row.is_pair:
        return None, "not_a_pair" if pair else "unexpected_pair"
    room = max_length - len(row.prompt_ids)
    if room < 1:
        return None, "prompt_too_long"
    longest = max(len(row.chosen_ids), len(row.rejected_ids))
    if longest <= room:
        return row, None
    if not cut_ok:
        return None, "too_long_for_sampled_reference"
    return replace(row, chosen_ids=row.chosen_ids[:room],
                   rejected_ids=row.rejected_ids[:room]), TRUNCATED


def deal_to_ranks(rows: Sequence[TrainRow], world_size: int) -> list[list[TrainRow]]:
    """Split one global batch into `world_size` equal lists (len(rows) must divide evenly).

    Rows are sorted by length (stable) and dealt round-robin, so every rank's list is sorted
    and its consecutive micro-batches hold rows of similar length, and the i-th micro-batch of
    every rank has similar cost (ranks wait less for each other at each collective).
    """
    if len(rows) % world_size:
        raise ValueError(f"{len(rows)} rows do not split evenly across {world_size} ranks")
    ordered = sorted(rows, key=lambda r: r.num_tokens)
    return [ordered[rank::world_size] for rank in range(world_size)]


def micro_batches(rows: Sequence[TrainRow], size: int) -> list[list[TrainRow]]:
    """Consecutive chunks of `size` rows (the last one may be smaller)."""
    return [list(rows[i:i + size]) for i in range(0, len(rows), size)]


def _longest_sequence(row: TrainRow) -> int:
    """Tokens of the row's longer sequence: its prompt + its longer response."""
    return len(row.prompt_ids) + max(len(row.chosen_ids), len(row.rejected_ids))


def padded_tokens(rows: Sequence[TrainRow]) -> int:
    """Tokens `collate(rows)` pads to: sequences (2 per pair row) x the longest sequence."""
    if not rows:
        return 0
    seqs = 2 if rows[0].is_pair else 1
    return seqs * len(rows) * max(_longest_sequence(r) for r in rows)


def token_micro_batches(rows: Sequence[TrainRow], budget: int,
                        count: int = 0) -> list[list[TrainRow]]:
    """Pack `rows` into micro-batches of at most `budget` padded tokens (`padded_tokens`),
    longest rows first, each micro-batch filled before the next starts (rows of similar
    length share a micro-batch, so little of the budget is padding). A row over the budget
    on its own gets a micro-batch of its own.

    `count` > the packing's length splits the largest micro-batches (by padded tokens) in
    halves until there are `count`, as far as rows allow: FSDP ranks must run the same
    number of forward passes per step, so every rank packs, agrees on the largest count,
    and splits up to it (see `actors.trainer.plan_micro_batches`).
    """
    ordered = sorted(rows, key=_longest_sequence, reverse=True)
    out: list[list[TrainRow]] = []
    for row in ordered:
        if out and padded_tokens(out[-1] + [row]) <= budget:
            out[-1].append(row)
        else:
            out.append([row])
    while len(out) < count and any(len(mb) > 1 for mb in out):
        i = max((j for j in range(len(out)) if len(out[j]) > 1),
                key=lambda j: padded_tokens(out[j]))
        big = out[i]
        out[i:i + 1] = [big[:len(big) // 2], big[len(big) // 2:]]
    return out


@dataclass
class Batch:
    """One micro-batch as tensors. N = B sequences (`all`) or 2B (`pair`: the B chosen
    sequences first, then the B rejected ones, so one forward pass covers both)."""

    input_ids: torch.Tensor  # (N, T) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (N, T) long, 1 on prompt and response tokens
    response_mask: torch.Tensor  # (N, T) bool, 1 on response tokens only
    p_chosen: torch.Tensor  # (B,) float32
    p_rejected: Optional[torch.Tensor]  # (B,) float32, pair only
    ref_chosen: Optional[torch.Tensor]  # (B,) float32, sampled-token reference log-probs
    ref_rejected: Optional[torch.Tensor]  # (B,) pair only

    @property
    def num_rows(self) -> int:
        return self.p_chosen.shape[0]

    @property
    def is_pair(self) -> bool:
        return self.p_rejected is not None

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def collate(rows: Sequence[TrainRow], pad_id: int, *, pad_to_multiple_of: int = 1) -> Batch:
    """Right-pad `rows` (all pairs or all singles) into one `Batch`.

    Right padding keeps position ids equal to token positions (HF models count positions from
    0 whatever the attention mask says). T = the longest sequence, rounded up to
    `pad_to_multiple_of`. Reference log-probs are filled only when every row carries them.
    """
    if not rows:
        raise ValueError("cannot collate an empty micro-batch")
    pair = rows[0].is_pair
    if any(r.is_pair != pair for r in rows):
        raise ValueError("a micro-batch mixes pair rows and single rows")
    seqs = [(r.prompt_ids, r.chosen_ids) for r in rows]
    if pair:
        seqs += [(r.prompt_ids, r.rejected_ids) for r in rows]
    longest = max(len(p) + len(c) for p, c in seqs)
    t = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), t), dtype=torch.long)
    response = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, (prompt, resp) in enumerate(seqs):
        n = len(prompt) + len(resp)
        input_ids[i, :n] = torch.tensor(list(prompt) + list(resp), dtype=torch.long)
        attention[i, :n] = 1
        response[i, len(prompt):n] = True

    def vec(values: list) -> Optional[torch.Tensor]:
        if any(v is None for v in values):
            return None
        return torch.tensor(values, dtype=torch.float32)

    return Batch(
        input_ids=input_ids, attention_mask=attention, response_mask=response,
        p_chosen=vec([r.chosen_p for r in rows]),
        p_rejected=vec([r.rejected_p for r in rows]) if pair else None,
        ref_chosen=vec([r.chosen_ref_logp for r in rows]),
        ref_rejected=vec([r.rejected_ref_logp for r in rows]) if pair else None,
    )
