"""Weights shared by the tests of actors/weights/: a small state dict of several shapes and
dtypes (a bf16 tensor among float32 ones), seeded."""

from __future__ import annotations

import torch


def state_of(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layers.0.w": torch.randn(16, 16, generator=g),
        "layers.0.b": torch.randn(16, generator=g),
        "layers.1.w": torch.randn(16, 16, generator=g),
        "scale": torch.randn((), generator=g),
        "head.weight": torch.randn(50, 16, generator=g).to(torch.bfloat16),
    }
