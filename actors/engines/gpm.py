"""A General Preference Model (GPM) as the judge: K forward passes per prompt, not K(K-1).

GPM (Zhang et al., arXiv 2410.02197) embeds each (prompt, response) once into a preference
vector v in R^D and scores a pair with a skew-symmetric form, so it can express cyclic
(intransitive) preferences, which a reward model cannot:

    s(i beats j | x) = <R(x) v_i, v_j> = sum_k lambda_k(x) (v_i[2k] v_j[2k+1] - v_i[2k+1] v_j[2k])

with R(x) block-diagonal of 2x2 rotations [[0, -lambda_k], [lambda_k, 0]], and
P(i beats j) = sigmoid(s / tau). Computed here exactly as the published recipe does (read in
the `general-preference-model` repository's `gpm_example_usage.py`, the inference code of the
model cards):
- the row: the checkpoint tokenizer's chat template over a user turn (the prompt) and an
  assistant turn (the response), no generation prompt, tokenised with the tokenizer's special
  tokens, cut at its end to `max_length` tokens (counted in `counters`), left-padded; its last
  token is overwritten by EOS (the recipe's "forced EOS");
- the backbone: the bare decoder (`AutoModel`: the checkpoint's `model.*` weights), position
  ids from the attention mask (0.. per row despite left padding); its final-norm hidden state;
- v = value_head(h at the last token), L2-normalised over D; `value_head.weight` (D, hidden)
  and `prompt_head.weight` (D/2, hidden), read from the checkpoint's safetensors files (D from
  the weights; no prompt head: every lambda_k = 1);
- lambda = softmax(prompt_head(h at the prompt's last token)), the prompt's last token being
  where the user-turn-only template ends inside the row; it is the same for every response of a
  prompt (causal attention), taken from its first row.
The heads, the normalisation and the score run in float32 on the gathered hidden states (the
recipe runs them in bf16: differences at bf16 rounding, never a sign except at near-ties).

`logits` returns per prompt the (K, K) matrix s / tau (skew-symmetric, so `sppo.preference`'s
`direct` reduction gives P = sigmoid(s / tau) exactly); rows of all prompts are sorted by length
and packed up to `max_batch_tokens` padded tokens per forward pass.

Not here: the preference maths (`sppo.preference`) and Ray (`actors.judge`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from actors.engines.pairrm import resolve_device, resolve_dtype

__all__ = ["GPMEngine", "gpm_scores", "read_heads"]


def read_heads(model_path: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`value_head.weight` (D, hidden) and `prompt_head.weight` (D/2, hidden) or None, from the
    checkpoint's safetensors files (float32)."""
    from safetensors import safe_open

    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) \
        if index.is_file() else [p.name for p in sorted(root.glob("*.safetensors"))]
    heads: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(root / name), framework="pt") as f:
            for key in ("value_head.weight", "prompt_head.weight"):
                if key in f.keys():
                    heads[key] = f.get_tensor(key).float()
    if "value_head.weight" not in heads:
        raise ValueError(f"{model_path!r} is not a GPM checkpoint: no value_head.weight in "
                         f"{files}")
    value = heads["value_head.weight"]
    if value.shape[0] % 2:
        raise ValueError(f"{model_path!r}: value_head.weight has {value.shape[0]} rows; a "
                         "GPM's preference embedding has an even size")
    prompt = heads.get("prompt_head.weight")
    if prompt is not None and prompt.shape[0] * 2 != value.shape[0]:
        raise ValueError(f"{model_path!r}: prompt_head.weight has {prompt.shape[0]} rows, "
                         f"expected {value.shape[0] // 2} (half of value_head's)")
    return value, prompt


def gpm_scores(v: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(K, K) s[i, j] = sum_k lam_k (v_i[2k] v_j[2k+1] - v_i[2k+1] v_j[2k]) for unit embeddings
    `v` (K, D) and gates `lam` (D/2,): Ve A Vo^T - Vo A Ve^T, A = diag(lam)."""
    m = (v[:, 0::2] * lam) @ v[:, 1::2].T  # m[i, j] = sum_k lam_k v_i[2k] v_j[2k+1]
    return m - m.T  # skew-symmetric to the last bit, zero diagonal


class GPMEngine:
    def __init__(self, model_path: str, max_length: int = 4096, max_batch_tokens: int = 16384,
                 tau: float = 0.1, dtype: str = "auto", device: Optional[str] = None):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.device = resolve_device(device)
        self.max_length, self.max_batch_tokens, self.tau = max_length, max_batch_tokens, tau
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"GPM {model_path!r}: its tokenizer has no EOS token (the score "
                             "is read at a forced EOS)")
        if not self.tokenizer.chat_template:
            raise ValueError(f"GPM {model_path!r}: its tokenizer has no chat template")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the heads and lm_head are "unexpected" in AutoModel
        try:
            self.model = AutoModel.from_pretrained(
                model_path, dtype=resolve_dtype(dtype, self.device)).to(self.device).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
        value, prompt = read_heads(model_path)
        hidden = self.model.config.hidden_size
        if value.shape[1] != hidden:
            raise ValueError(f"GPM {model_path!r}: value_head.weight is {tuple(value.shape)}, "
                             f"the backbone's hidden size is {hidden}")
        self.value_head = value.to(self.device)
        self.prompt_head = None if prompt is None else prompt.to(self.device)
        self.dim = value.shape[0]
        self._counts = {"rows": 0, "truncated_rows": 0, "forward_passes": 0}

    # ------------------------------------------------------------------ public API

    def embed(self, prompts: list[str], responses: list[str]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) unit embeddings of responses[n] to prompts[n] and (N, D/2) gates of their
        prompts, float32."""
        rows = [self._row(p, r) for p, r in zip(prompts, responses)]
        v = torch.empty(len(rows), self.dim, device=self.device)
        lam = torch.empty(len(rows), self.dim // 2, device=self.device)
        for idx in self._batches([len(ids) for ids, _ in rows]):
            width = max(len(rows[n][0]) for n in idx)
            ids = torch.full((len(idx), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            prompt_end = torch.empty(len(idx), dtype=torch.long)
            for b, n in enumerate(idx):
                row, response_len = rows[n]
                ids[b, width - len(row):] = torch.tensor(row)
                mask[b, width - len(row):] = 1
                prompt_end[b] = width - response_len - 1
            ids[:, -1] = self.tokenizer.eos_token_id  # the recipe's forced EOS
            mask[:, -1] = 1
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            with torch.inference_mode():
                h = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               position_ids=position_ids.to(self.device)).last_hidden_state
            self._counts["forward_passes"] += 1
            rows_at = torch.arange(len(idx), device=self.device)
            last = h[:, -1].float()
            at_prompt = h[rows_at, prompt_end.to(self.device)].float()
            vec = last @ self.value_head.T
            v[idx] = torch.nn.functional.normalize(vec, p=2, dim=-1)
            lam[idx] = torch.softmax(at_prompt @ self.prompt_head.T, dim=-1) \
                if self.prompt_head is not None else torch.ones(len(idx), self.dim // 2,
                                                                device=self.device)
        return v, lam

    def logits(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """Per prompt the (K, K) matrix s[i, j] / tau (skew-symmetric, diagonal 0): one
        embedding per response, all prompts' rows in shared forward passes."""
        flat_p = [p for p, cands in zip(prompts, candidates) for _ in cands]
        flat_r = [c for cands in candidates for c in cands]
        v, lam = self.embed(flat_p, flat_r)
        out, start = [], 0
        for cands in candidates:
            k = len(cands)
            s = gpm_scores(v[start:start + k], lam[start])
            out.append((s / self.tau).double().cpu().numpy())
            start += k
        return out

    def pair_logits(self, prompts: list[str], a: list[str], b: list[str]) -> np.ndarray:
        """(N,) s(a[n] beats b[n]) / tau, the gate from a's row (the recipe's)."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(a)} a, {len(b)} b")
        v, lam = self.embed(list(prompts) * 2, list(a) + list(b))
        n = len(a)
        va, vb, g = v[:n], v[n:], lam[:n]
        s = (g * (va[:, 0::2] * vb[:, 1::2] - va[:, 1::2] * vb[:, 0::2])).sum(-1)
        return (s / self.tau).double().cpu().numpy()

    def counters(self) -> dict:
        """Rows embedded, rows cut at `max_length`, forward passes, since start."""
        return dict(self._counts)

    # ------------------------------------------------------------------ internals

    def _row(self, prompt: str, response: str) -> tuple[list[int], int]:
        """(token ids of the row, cut to max_length; its response's length in tokens)."""
        user = [{"role": "user", "content": prompt}]
        full = self.tokenizer.apply_chat_template(user + [{"role": "assistant",
                                                           "content": response}], tokenize=False)
        head = self.tokenizer.apply_chat_template(user, tokenize=False)
        ids = self.tokenizer(full)["input_ids"]
        n_prompt = len(self.tokenizer(head)["input_ids"])
        self._counts["rows"] += 1
        if len(ids) > self.max_length:
            self._counts["truncated_rows"] += 1
            ids = ids[:self.max_length]
        return ids, len(ids) - min(n_prompt, self.max_length)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Row indices sorted by length, packed so that rows x longest <= max_batch_tokens."""
        order = sorted(range(len(lengths)), key=lambda n: lengths[n])
        batches: list[list[int]] = []
        for n in order:
            if batches and (len(batches[-1]) + 1) * lengths[n] <= self.max_batch_tokens:
                batches[-1].append(n)
            else:
                batches.append([n])
        return batches
