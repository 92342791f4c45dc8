"""PairRM through llm-blender's own ranker, with all ordered pairs of many prompts batched.

llm-blender's `Blender.rank(..., batch_size=1)` (the official SPPO call) runs K(K-1) forward
passes of one pair each per prompt. This engine loads the same ranker with `Blender.loadranker`
and tokenizes each prompt with the same collator, then runs the ranker's own pair forward
(`CrossCompareReranker._forward`, what `Blender.compare` calls) on batches of `batch_size`
ordered pairs drawn from all prompts, sorted by length so that a batch pads little.

Numbers match llm-blender's: each prompt is tokenized on its own, exactly as `rank` with
`batch_size=1` does, so PairRM's length limits (`source_max_length` tokens for the prompt,
`candidate_max_length` for each response plus half of the prompt budget the prompt leaves
unused) do not depend on which prompts share a batch. Padding is masked, so batching changes
the logits only by float rounding.

Not here: the preference maths (`sppo.preference`) and Ray (`actors.judge`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from actors.engines.blender_compat import import_llm_blender

__all__ = ["PairRMEngine", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: Optional[str]) -> str:
    """`device`, or cuda when a GPU is visible (inside Ray: when the actor was given one)."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """"auto": bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class PairRMEngine:
    """Logits `l_ij` that response i beats response j (i shown first) from a PairRM ranker.

    model_path: a ranker directory (`config.json` + weights) or a hub id, as for
    `Blender.loadranker`; backbone: a local backbone directory or id overriding the config's
    `model_name` (the hub default `microsoft/deberta-v3-large` cannot resolve offline).
    """

    def __init__(self, model_path: str, backbone: Optional[str] = None, batch_size: int = 32,
                 source_max_length: int = 1224, candidate_max_length: int = 412,
                 dtype: str = "auto", device: Optional[str] = None):
        llm_blender = import_llm_blender()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        overrides = {"source_maxlength": source_max_length,
                     "candidate_maxlength": candidate_max_length,
                     "fp16": False}  # we cast below, to bf16 as well as fp16
        if backbone:
            overrides["model_name"] = backbone
        self.blender = llm_blender.Blender(
            llm_blender.BlenderConfig(device=self.device, use_tqdm=False))
        self.blender.loadranker(model_path, device=self.device, **overrides)
        if self.blender.ranker_config.ranker_type != "pairranker":
            raise ValueError(f"{model_path!r} is a {self.blender.ranker_config.ranker_type!r} "
                             "ranker, not PairRM's 'pairranker'; use the reward_model backend")
        self.ranker = self.blender.ranker.to(self.dtype).eval()
        self.collator = self.blender.ranker_collator
        self.pad_id = self.blender.ranker_tokenizer.pad_token_id

    # ------------------------------------------------------------------ public API

    def logits(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """Per prompt a (K, K) float32 matrix of l_ij for every i != j; diagonal 0."""
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        encoded = [self._encode(p, c) for p, c in zip(prompts, candidates)]
        rows, where = [], []
        for n, (src, cands) in enumerate(encoded):
            for i in range(len(cands)):
                for j in range(len(cands)):
                    if i != j:
                        rows.append((src, cands[i], cands[j]))
                        where.append((n, i, j))
        out = [np.zeros((len(c), len(c)), dtype=np.float32) for c in candidates]
        for (n, i, j), value in zip(where, self._score_rows(rows)):
            out[n][i, j] = value
        return out

    def pair_logits(self, prompts: list[str], a: list[str], b: list[str]) -> np.ndarray:
        """(N,) logits that a[n] beats b[n] for prompts[n], a shown first; equals
        `Blender.compare(prompts, a, b, mode="[A,B]", return_logits=True)`."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(a)} a, {len(b)} b")
        rows = []
        for p, x, y in zip(prompts, a, b):
            src, (cx, cy) = self._encode(p, [x, y])
            rows.append((src, cx, cy))
        return self._score_rows(rows)

    # ------------------------------------------------------------------ internals

    def _encode(self, prompt: str, cands: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """llm-blender's collator on one prompt: source ids (S,), K candidate ids (C_k,)."""
        batch = self.collator([{"index": 0, "source": prompt, "candidates": list(cands)}])
        src = batch["source_ids"][0][batch["source_attention_mask"][0].bool()]
        ids, mask = batch["candidate_ids"][0], batch["candidate_attention_mask"][0]  # (K, C)
        return src, [ids[k][mask[k].bool()] for k in range(len(cands))]

    def _score_rows(self, rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                    ) -> np.ndarray:
        """Ranker logits for (source, left, right) rows, batched by total length."""
        out = np.empty(len(rows), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda r: sum(len(t) for t in rows[r]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                src, left, right = (self._pad([rows[r][part] for r in idx]) for part in range(3))
                logits = self.ranker._forward(*src, *left, *right)["logits"]  # (B,)
                out[idx] = logits.float().cpu().numpy()
        return out

    def _pad(self, seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to (B, T) ids and mask; the ranker moves padding after the separators."""
        ids = torch.full((len(seqs), max(len(s) for s in seqs)), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, s in enumerate(seqs):
            ids[k, :len(s)] = s
            mask[k, :len(s)] = 1
        return ids.to(self.device), mask.to(self.device)
