"""PairRM through llm-blender's own ranker, with all ordered pairs of many prompts batched.

What the official SPPO call costs: `Blender.rank(..., return_scores=True, batch_size=1)` runs
`CrossCompareReranker._full_predict`, which loops over the K(K-1) ordered pairs of a prompt and
makes one forward pass of one pair each (it does not batch a prompt's pairs). Each pass is the
transformers DeBERTa-v2 forward on [source; left; right] (~300-1300 tokens for real prompts),
which, besides its GEMMs, builds several (heads, L, L) float tensors per layer (scores, two
gathered relative-position scores, their scaled copies and sum, the mask, the softmax) and
projects all 512 relative-position embeddings again; on a CPU, for a pair of ~900 tokens, that
is a third to a half of the pass. Batching pairs cannot save GEMM work on a CPU (a one-pair pass is
already ~900 rows), and padding a batch makes the L x L part grow.

What this engine does, with the same numbers: it loads the ranker with `Blender.loadranker`,
tokenizes each prompt once with the same collator (so PairRM's length limits, `source_max_length`
tokens for the prompt and `candidate_max_length` for each response plus half of the prompt
budget the prompt leaves unused, are per prompt as in `rank`), packs each ordered pair's ids as
`cat_ids` does, and scores `batch_size` pairs per pass, sorted by length, with the ranker's own
head on the `<|source|>`, `<|candidate1|>`, `<|candidate2|>` states as `_forward` (what
`Blender.compare` calls) does. For a DeBERTa-v2/v3 backbone (PairRM's) the pass is
`DisentangledEncoder`: the pairs packed end to end without padding, attention per pair a few
heads at a time, the transformers arithmetic op for op (a batch of one is bit-identical to it).
Other backbones go through the ranker's `_forward` on padded batches.

On 2 CPU cores this is ~1.6-1.9x the official throughput at realistic lengths (`bench/judge.py`);
`dtype="bfloat16"` (opt-in; the CPU default is float32) adds bf16 GEMMs for ~2-2.7x, at a
precision cost the benchmark and the tests bound. On a GPU, where a one-pair pass leaves the
device idle, batching is the larger gain.

Not here: the preference maths (`sppo.preference`) and Ray (`actors.judge`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from actors.engines.blender_compat import import_llm_blender

__all__ = ["PairRMEngine", "DisentangledEncoder", "resolve_device", "resolve_dtype"]

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
        self.tokenizer = self.blender.ranker_tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        # None: another backbone, scored by the ranker's own `_forward` on padded batches.
        backbone_model = self.ranker.pretrained_model
        self.encoder = (DisentangledEncoder(backbone_model)
                        if DisentangledEncoder.supports(backbone_model) else None)

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
                if self.encoder is None:
                    parts = (self._pad([rows[r][part] for r in idx]) for part in range(3))
                    logits = self.ranker._forward(*(t for part in parts for t in part))["logits"]
                else:
                    logits = self._forward_packed([self._pack(*rows[r]) for r in idx])
                out[idx] = logits.float().cpu().numpy()
        return out

    def _pack(self, src: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """One pair's ids as `CrossCompareReranker._forward` builds them: the source, the left
        response with its `<|candidate|>` prefix made `<|candidate1|>`, the right one's made
        `<|candidate2|>` (each piece ends with its separator; `cat_ids` moves padding last)."""
        tok = self.tokenizer
        return torch.cat([src, torch.where(left == tok.cand_prefix_id, tok.cand1_prefix_id, left),
                          torch.where(right == tok.cand_prefix_id, tok.cand2_prefix_id, right)])

    def _forward_packed(self, seqs: list[torch.Tensor]) -> torch.Tensor:
        """(B,) logits of packed pairs: `CrossCompareReranker._forward`'s head and reduction
        on the states of each pair's `<|source|>`, `<|candidate1|>`, `<|candidate2|>` token."""
        ids = torch.cat(seqs).to(self.device)  # (T,) pairs end to end, no padding
        lengths = [len(x) for x in seqs]
        states = self.encoder(ids, lengths)  # (T, hidden)
        ends = torch.tensor(np.cumsum(lengths), device=self.device)
        pair = torch.arange(len(seqs), device=self.device)
        tok = self.tokenizer

        def at(token_id: int) -> torch.Tensor:  # (B, hidden): that token's state in each pair
            where = torch.nonzero(ids == token_id)[:, 0]  # ascending
            if len(where) != len(seqs) or not torch.equal(
                    torch.searchsorted(ends, where, right=True), pair):
                raise ValueError(f"expected token {token_id} once in each of {len(seqs)} pairs "
                                 "(does a text contain one of PairRM's prefix tokens?)")
            return states[where]

        src = at(tok.source_prefix_id)
        left, right = at(tok.cand1_prefix_id), at(tok.cand2_prefix_id)
        head = self.ranker.head_layer
        return (head(torch.cat([src, left], -1)) - head(torch.cat([src, right], -1))).mean(-1)

    def _pad(self, seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to (B, T) ids and mask; the ranker moves padding after the separators."""
        ids = torch.full((len(seqs), max(len(s) for s in seqs)), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, s in enumerate(seqs):
            ids[k, :len(s)] = s
            mask[k, :len(s)] = 1
        return ids.to(self.device), mask.to(self.device)


class DisentangledEncoder:
    """Inference forward of a transformers `DebertaV2Model` (its last hidden state) over
    sequences packed end to end without padding, with the model's own modules and weights.

    Everything but attention works token by token, so it runs once on all tokens of the batch,
    (T, hidden), with no padding. Attention runs per sequence on its own length, a few heads at
    a time (`block` score entries), re-expressed op for op as `DisentangledSelfAttention.forward`
    in transformers 5 (same operands, layouts and order): a batch of one gives the same bits as
    transformers, a larger batch differs only by the GEMMs' rounding on more rows (padding never
    enters a pair's attention or softmax, unlike a padded batch through transformers), while never
    materialising transformers' several (B, heads, L, L) tensors per layer (on a CPU, for long
    pairs, allocating and walking those is a third to a half of it). Exact savings besides:
    the relative-position projections are computed once per batch, for the buckets used only."""

    def __init__(self, model, block: int = 1 << 20):
        self.model = model
        self.block = block
        att = model.encoder.layer[0].attention.self
        self.heads, self.head_size, self.span = (att.num_attention_heads,
                                                 att.attention_head_size, att.pos_ebd_size)

    @staticmethod
    def supports(model) -> bool:
        """PairRM's backbone shape: DeBERTa-v2/v3 with c2p and p2c relative attention."""
        from transformers import DebertaV2Model

        return (isinstance(model, DebertaV2Model) and model.encoder.relative_attention
                and model.encoder.conv is None and model.z_steps <= 1
                and sorted(model.config.pos_att_type or []) == ["c2p", "p2c"])

    def __call__(self, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """ids: (T,) sequences of `lengths` end to end. Returns (T, hidden)."""
        enc = self.model.encoder
        hidden = self.model.embeddings(input_ids=ids[None])[0]  # (T, hidden); no mask: no pad
        rel_pos = enc.get_rel_pos(hidden[:max(lengths)][None])[0]  # (L, L) bucketed i - j
        span = self.span
        c2p_pos = torch.clamp(rel_pos + span, 0, 2 * span - 1)
        p2c_pos = torch.clamp(-rel_pos + span, 0, 2 * span - 1)
        # Only buckets [lo, hi) occur up to this length: project just those rows.
        lo = int(torch.minimum(c2p_pos.min(), p2c_pos.min()))
        hi = int(torch.maximum(c2p_pos.max(), p2c_pos.max())) + 1
        rel = enc.get_rel_embedding()[lo:hi]  # (R, hidden)
        positions = (c2p_pos - lo, p2c_pos - lo)
        for layer in enc.layer:
            context = self._attention(layer.attention.self, hidden, rel, positions, lengths)
            attended = layer.attention.output(context, hidden)
            hidden = layer.output(layer.intermediate(attended), attended)
        return hidden

    def _attention(self, att, hidden: torch.Tensor, rel: torch.Tensor,
                   positions: tuple[torch.Tensor, torch.Tensor], lengths: list[int]
                   ) -> torch.Tensor:
        H, D = self.heads, self.head_size

        def heads(x: torch.Tensor) -> torch.Tensor:  # (T, H*D) -> (H, T, D)
            return x.view(len(x), H, D).transpose(0, 1).contiguous()

        q, k, v = (heads(proj(hidden)) for proj in (att.query_proj, att.key_proj, att.value_proj))
        shared = att.share_att_key
        pos_key = heads((att.key_proj if shared else att.pos_key_proj)(rel))  # (H, R, D)
        pos_query = heads((att.query_proj if shared else att.pos_query_proj)(rel))
        scale = torch.sqrt(torch.tensor(D, dtype=torch.float) * 3).to(hidden.dtype)
        context = torch.empty(len(hidden), H, D, dtype=hidden.dtype, device=hidden.device)
        start = 0
        for L in lengths:
            c2p_pos, p2c_pos = (x[:L, :L] for x in positions)  # (L, L)
            per = max(1, self.block // (L * L))
            for h0 in range(0, H, per):
                h1 = min(H, h0 + per)
                n = h1 - h0
                qs, ks, vs = (x[h0:h1, start:start + L] for x in (q, k, v))  # (n, L, D)
                scores = torch.bmm(qs, ks.transpose(-1, -2) / scale)  # (n, L, L)
                c2p = torch.gather(torch.bmm(qs, pos_key[h0:h1].transpose(-1, -2)), -1,
                                   c2p_pos.expand(n, L, L))
                p2c = torch.gather(torch.bmm(ks, pos_query[h0:h1].transpose(-1, -2)), -1,
                                   p2c_pos.expand(n, L, L))
                # In place where transformers allocates; the same operations on the same values.
                rel_scores = c2p.div_(scale)
                rel_scores += p2c.div_(scale).transpose(-1, -2)
                probs = torch.softmax(scores.add_(rel_scores), dim=-1)
                context[start:start + L, h0:h1] = torch.bmm(probs, vs).transpose(0, 1)
            start += L
        return context.view(len(hidden), H * D)
