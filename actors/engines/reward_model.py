"""A scalar reward model as a pairwise judge: `l_ij = r_i - r_j` (Bradley-Terry).

Any transformers `AutoModelForSequenceClassification` with one output. Each response is scored
once (N*K forward rows, not N*K*(K-1)), in batches sorted by length. The input is the
tokenizer's chat template applied to a user turn (the prompt) and an assistant turn (the
response) when the tokenizer has one, else the (prompt, response) text pair; the prompt is
truncated to `source_max_length` tokens and the response to `candidate_max_length`.

Not here: the preference maths (`sppo.preference`) and Ray (`actors.judge`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from actors.engines.pairrm import resolve_device, resolve_dtype

__all__ = ["RewardModelEngine"]


class RewardModelEngine:
    def __init__(self, model_path: str, batch_size: int = 32, source_max_length: int = 1224,
                 candidate_max_length: int = 412, dtype: str = "auto",
                 device: Optional[str] = None, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.source_max_length = source_max_length
        self.candidate_max_length = candidate_max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model_path,
                                                       trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=resolve_dtype(dtype, self.device),
            trust_remote_code=trust_remote_code).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {model_path!r} has num_labels="
                             f"{self.model.config.num_labels}; a scalar reward needs 1")
        if self.tokenizer.pad_token is None:  # decoder RMs often ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # needed to find the last token per row
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    # ------------------------------------------------------------------ public API

    def rewards(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """(N,) float32 rewards of responses[n] to prompts[n]."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [self._encode(p, r) for p, r in zip(prompts, responses)]
        out = np.empty(len(rows), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda n: len(rows[n]["input_ids"]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer.pad([rows[n] for n in idx],
                                           return_tensors="pt").to(self.device)
                logits = self.model(**batch).logits  # (B, 1)
                out[idx] = logits[:, 0].float().cpu().numpy()
        return out

    def logits(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """Per prompt the (K, K) matrix r_i - r_j (antisymmetric, diagonal 0)."""
        flat_p = [p for p, cands in zip(prompts, candidates) for _ in cands]
        flat_r = [c for cands in candidates for c in cands]
        r = self.rewards(flat_p, flat_r)
        out, start = [], 0
        for cands in candidates:
            rk = r[start:start + len(cands)]
            out.append(rk[:, None] - rk[None, :])
            start += len(cands)
        return out

    def pair_logits(self, prompts: list[str], a: list[str], b: list[str]) -> np.ndarray:
        """(N,) logits r(a[n]) - r(b[n])."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(a)} a, {len(b)} b")
        r = self.rewards(list(prompts) * 2, list(a) + list(b))
        return r[:len(a)] - r[len(a):]

    # ------------------------------------------------------------------ internals

    def _truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens])

    def _encode(self, prompt: str, response: str) -> dict[str, list[int]]:
        """input_ids (and token_type_ids where the tokenizer makes them) of one row."""
        prompt = self._truncate(prompt, self.source_max_length)
        response = self._truncate(response, self.candidate_max_length)
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=False)
            enc = self.tokenizer(text, add_special_tokens=False)
        else:
            enc = self.tokenizer(prompt, response)
        return {k: v for k, v in enc.items() if k != "attention_mask"}
