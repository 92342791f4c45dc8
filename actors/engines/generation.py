"""What every generation engine shares: the interface, the seed rule and per-prompt isolation.

An engine turns a batch of already templated and tokenized `Prompt`s into one record per
prompt, in input order: a `Generation` with K samples, or a `Failed` naming why that prompt
could not be done. One bad prompt never costs the others their samples and never raises out
of `generate`.

Seed semantics (both backends): prompt `p` gets the seed `prompt_seed(seed, p.id)` and its
j-th sample is drawn from a random stream seeded with `prompt_seed(seed, p.id) + j` (vLLM's own
rule for the children of an `n > 1` request). Samples therefore depend on the weights, the
sampling settings, the seed and the prompt alone: not on which other prompts share the batch,
on the order of calls, or on what the process ran before (up to the last-bit floating-point
differences another batch shape can make, which could flip a near-tie). The two backends use
different random number generators, so the same seed does not give the same text on both.

Not here: Ray, and anything backend-specific.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Protocol, Sequence

from sppo.records import Failed, Generation, Prompt

__all__ = ["GenerationEngine", "prompt_seed", "prompt_problem", "screen_prompts",
           "generate_isolated", "check_weights", "Record"]

Record = Generation | Failed


class GenerationEngine(Protocol):
    """The interface `actors.generator.Generator` drives; see the HF and vLLM engines.

    Weights arrive three ways: a sync from the trainer's sender (`join_weight_group` once per
    group, then per sync `prepare_receive` before any bucket is sent, `receive_weights`, and
    `abort_receive` to close a sync that failed; the buckets reach the processes that hold the
    weights), a checkpoint directory (`reload_weights`), or, on the HF engine only,
    object-store buckets (`start_weight_update`, `update_weights` per bucket,
    `finish_weight_update`)."""

    weight_version: int
    weight_receivers: int  # processes that join the weight group (vLLM: one per worker)

    def generate(self, prompts: Sequence[Prompt]) -> list[Record]: ...

    def chat(self, token_ids: Sequence[int], *, max_tokens: int, temperature: float,
             top_p: float, n: int, seed: int) -> list[dict]: ...

    def join_weight_group(self, address: dict, rank_offset: int) -> None: ...

    def leave_weight_group(self) -> None: ...

    def prepare_receive(self, layout: dict) -> None: ...

    def receive_weights(self, layout: dict, version: int) -> None: ...

    def abort_receive(self) -> None: ...

    def reload_weights(self, checkpoint_dir: str, version: int) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, bucket: dict) -> None: ...

    def finish_weight_update(self, version: Optional[int] = None) -> int: ...

    def state_dict_numpy(self) -> dict: ...


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A stable 31-bit seed for one prompt (sha256, so it does not vary with PYTHONHASHSEED).

    31 bits leave room for `+ j` per sample and fit every seed API (torch, vLLM)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31 - 1024)


def prompt_problem(prompt: Prompt, max_new_tokens: int, max_len: int,
                   vocab_size: int) -> Optional[str]:
    """Why `prompt` cannot be generated from, or None when it can."""
    n = len(prompt.token_ids)
    if n == 0:
        return "empty prompt (no token ids)"
    if n + max_new_tokens > max_len:
        return (f"prompt of {n} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                f"context of {max_len} tokens")
    bad = [t for t in prompt.token_ids if not 0 <= t < vocab_size]
    if bad:
        return f"token ids outside the vocabulary of {vocab_size}: {bad[:5]}"
    return None


def screen_prompts(prompts: Sequence[Prompt], problem: Callable[[Prompt], Optional[str]]
                   ) -> tuple[list[Optional[Record]], list[int]]:
    """One slot per prompt: a `Failed` for each prompt that `problem` finds fault with, None
    for the others, whose indices come second (to be generated)."""
    out: list[Optional[Record]] = [None] * len(prompts)
    todo: list[int] = []
    for i, p in enumerate(prompts):
        try:
            why = problem(p)
        except Exception as exc:  # e.g. token ids that are not integers
            why = f"invalid prompt: {type(exc).__name__}: {exc}"
        if why is None:
            todo.append(i)
        else:
            out[i] = Failed(p.id, "generate", why)
    return out, todo


def generate_isolated(prompts: Sequence[Prompt], problem: Callable[[Prompt], Optional[str]],
                      run_batch: Callable[[list[Prompt]], list[Record]]) -> list[Record]:
    """Records for `prompts` in input order: invalid prompts become `Failed` up front, the
    rest run as one batch; if the batch raises, each prompt is retried alone so that only
    the prompt at fault fails (e.g. one that runs the device out of memory)."""
    out, todo = screen_prompts(prompts, problem)
    if todo:
        batch = [prompts[i] for i in todo]
        try:
            done = run_batch(batch)
        except Exception:
            done = [rec for p in batch for rec in _alone(p, run_batch)]
        for i, rec in zip(todo, done, strict=True):
            out[i] = rec
    return out  # type: ignore[return-value]


def _alone(prompt: Prompt, run_batch: Callable[[list[Prompt]], list[Record]]) -> list[Record]:
    try:
        return run_batch([prompt])
    except Exception as exc:  # this prompt's own failure: report it, keep the actor alive
        return [Failed(prompt.id, "generate", f"{type(exc).__name__}: {exc}")]


def check_weights(named: list[tuple[str, Any]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming the first tensor whose name or shape the model does not have,
    before anything is loaded (so a bad bucket leaves the weights as they were)."""
    for name, value in named:
        if name not in shapes:
            raise ValueError(f"unknown weight {name!r} (not in the model's state_dict)")
        if tuple(value.shape) != tuple(shapes[name]):
            raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, the model's "
                             f"has {tuple(shapes[name])}")
