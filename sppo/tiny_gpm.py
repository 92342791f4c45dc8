"""A tiny General Preference Model (GPM) in the published checkpoints' layout, built locally.

The GPM checkpoints (`general-preference/GPM-Llama-3.1-8B`, `GPM-Gemma-2B`, ...) are a plain
decoder checkpoint (its `config.json` the backbone's own, `model.*` and `lm_head.weight` as a
`*ForCausalLM` saves them) plus two bias-free heads stored beside it in the safetensors files:
`value_head.weight` of shape (D, hidden) and, optionally, `prompt_head.weight` of shape
(D/2, hidden); D, the preference embedding's size (even), is read from the weights (read in
the `general-preference-model` repository's `gpm_example_usage.py`; nothing GPM-specific is in
`config.json`). This builds one on the tiny Llama of `sppo.tiny` (its tokenizer and chat
template), with seeded random heads, so the judge runs offline: `builtin:tiny-gpm`.

Not here: scoring (`actors.engines.gpm`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from sppo.tiny import TinySpec, build_tiny_llama, build_tiny_tokenizer

__all__ = ["TinyGPMSpec", "save_gpm", "save_tiny_gpm", "ensure_tiny_gpm"]

HEAD_NAMES = ("value_head.weight", "prompt_head.weight")


@dataclass(frozen=True)
class TinyGPMSpec:
    backbone: TinySpec = TinySpec(seed=7)
    value_head_dim: int = 4  # D, even; GPM-Llama-3.1-8B is read as 4 or 6, GPM-Gemma-2B as 8
    prompt_head: bool = True
    head_scale: float = 0.3  # the heads' random weights' standard deviation
    seed: int = 11

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + self.backbone.key()
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def save_gpm(out_dir: str | Path, model, tokenizer, value_head, prompt_head=None) -> Path:
    """Save `model` (a `*ForCausalLM`) and `tokenizer` with the heads, as the published GPM
    checkpoints are laid out: the heads' tensors in the safetensors file beside `model.*`."""
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (weights,) = list(out.glob("*.safetensors"))  # one file: the tiny models are small
    tensors = load_file(str(weights))
    tensors["value_head.weight"] = value_head.detach().to(next(iter(tensors.values())).dtype)
    if prompt_head is not None:
        tensors["prompt_head.weight"] = prompt_head.detach().to(tensors["value_head.weight"].dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights),
              metadata={"format": "pt"})
    return out


def save_tiny_gpm(out_dir: str | Path, spec: TinyGPMSpec = TinyGPMSpec()) -> Path:
    """Build the tiny GPM for `spec` into `out_dir` (atomically)."""
    import torch

    if spec.value_head_dim % 2:
        raise ValueError(f"value_head_dim must be even, got {spec.value_head_dim}")
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tokenizer = build_tiny_tokenizer(spec.backbone)
    model = build_tiny_llama(spec.backbone, tokenizer)
    hidden = spec.backbone.hidden_size
    gen = torch.Generator().manual_seed(spec.seed)
    value = torch.randn(spec.value_head_dim, hidden, generator=gen) * spec.head_scale
    prompt: Optional[torch.Tensor] = torch.randn(spec.value_head_dim // 2, hidden,
                                                 generator=gen) * spec.head_scale \
        if spec.prompt_head else None
    save_gpm(tmp, model, tokenizer, value, prompt)
    (tmp / "tiny_gpm_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    try:
        tmp.rename(out)
    except OSError:  # another process won the race; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_tiny_gpm(cache_dir: str | Path = "~/.cache/sppo-ray",
                    spec: TinyGPMSpec = TinyGPMSpec()) -> Path:
    """Path of the cached tiny GPM for `spec`, building it on first use."""
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"tiny-gpm-{spec.key()}"
    if not (out / "config.json").is_file():
        save_tiny_gpm(out, spec)
    return out
