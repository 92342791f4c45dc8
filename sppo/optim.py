"""Per-round optimizer and learning-rate schedule.

Each SPPO round starts a fresh optimizer and schedule (DESIGN step 5). The schedule is linear
warmup then linear decay, as Hugging Face's `get_linear_schedule_with_warmup`, over a horizon
measured in epochs that is separate from the epochs actually trained: the published runs set an
18-epoch schedule and stop after 1 epoch, so the learning rate only decays by ~1/18 per round.

With streamed rows the number of steps per epoch is not known up front; the driver passes the
round's expected row count, and `schedule_steps` turns it into steps the way HF's Trainer does
(a final partial batch counts as a step; warmup steps = ceil(ratio * horizon)).

Not here: gradient accumulation and clipping (the trainer loop's business) and anything Ray.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["build_optimizer", "schedule_steps", "linear_lr_factor", "build_scheduler"]


def build_optimizer(model: torch.nn.Module, name: Literal["rmsprop", "adamw"], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """A fresh RMSprop or AdamW over `model`'s trainable parameters.

    Weight decay applies to matrices only (ndim >= 2), not to norms and biases, as HF's Trainer
    does. Hyper-parameters other than lr and weight decay are torch's defaults, which are also
    HF's (`optim=rmsprop`: alpha 0.99, eps 1e-8; `adamw_torch`: betas (0.9, 0.999), eps 1e-8).
    Works on FSDP2 (DTensor) parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'rmsprop' or 'adamw', got {name!r}")


def schedule_steps(expected_rows: int, global_batch_size: int, schedule_epochs: float,
                   warmup_ratio: float) -> tuple[int, int]:
    """(horizon_steps, warmup_steps) for a round expected to stream `expected_rows` rows.

    steps per epoch = ceil(rows / global batch); horizon = ceil(schedule_epochs * that), at
    least 1; warmup = ceil(warmup_ratio * horizon).
    """
    if expected_rows < 0 or global_batch_size <= 0:
        raise ValueError(f"need expected_rows >= 0 and global_batch_size > 0, got "
                         f"{expected_rows} and {global_batch_size}")
    per_epoch = math.ceil(expected_rows / global_batch_size)
    horizon = max(1, math.ceil(schedule_epochs * per_epoch))
    return horizon, math.ceil(warmup_ratio * horizon)


def linear_lr_factor(step: int, horizon: int, warmup: int) -> float:
    """Multiplier of the base lr for the optimizer step taken after `step` earlier steps.

    Same values as HF `get_linear_schedule_with_warmup`: `step / warmup` during warmup (so the
    very first step has lr 0 when warmup > 0), then `(horizon - step) / (horizon - warmup)`,
    never below 0 (steps past the horizon, when more rows came than expected, get lr 0).
    """
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (horizon - step) / max(1, horizon - warmup))


def build_scheduler(optimizer: torch.optim.Optimizer, horizon: int,
                    warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` over `linear_lr_factor`; call `.step()` once after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_lr_factor(step, horizon, warmup))
