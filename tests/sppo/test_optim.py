"""sppo/optim.py: fresh optimizers and the linear warmup/decay schedule with its own horizon."""

from __future__ import annotations

import pytest
import torch

from sppo.optim import build_optimizer, build_scheduler, linear_lr_factor, schedule_steps


def test_schedule_steps_horizon_is_in_schedule_epochs_not_trained_epochs():
    # 130 rows, batch 64 -> 3 steps per epoch (the partial batch counts); 18 epochs -> 54
    assert schedule_steps(130, 64, 18.0, 0.1) == (54, 6)  # warmup ceil(5.4)
    assert schedule_steps(128, 64, 1.0, 0.0) == (2, 0)
    assert schedule_steps(0, 64, 18.0, 0.1) == (1, 1)  # never a zero horizon


def test_linear_factor_at_warmup_end_mid_decay_and_horizon():
    horizon, warmup = 100, 10
    assert linear_lr_factor(0, horizon, warmup) == 0.0  # HF: the first step has lr 0
    assert linear_lr_factor(5, horizon, warmup) == 0.5
    assert linear_lr_factor(10, horizon, warmup) == 1.0  # warmup end: the peak
    assert linear_lr_factor(55, horizon, warmup) == 0.5  # half way down the decay
    assert linear_lr_factor(100, horizon, warmup) == 0.0
    assert linear_lr_factor(130, horizon, warmup) == 0.0  # past the horizon: clamped
    assert linear_lr_factor(0, horizon, 0) == 1.0


def test_one_epoch_of_an_18_epoch_schedule_barely_decays():
    horizon, warmup = schedule_steps(640, 64, 18.0, 0.1)  # 10 steps/epoch, 180 steps
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, "rmsprop", 1.0, 0.0)
    sched = build_scheduler(opt, horizon, warmup)
    lrs = []
    for _ in range(10):  # one trained epoch
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [linear_lr_factor(s, horizon, warmup) for s in range(10)]
    assert lrs[-1] == pytest.approx(9 / 18)  # still warming up: 18 warmup steps


@pytest.mark.parametrize("name, cls", [("rmsprop", torch.optim.RMSprop),
                                       ("adamw", torch.optim.AdamW)])
def test_build_optimizer_decays_matrices_only(name, cls):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, name, 1e-3, 0.1)
    assert isinstance(opt, cls)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(4, 3)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)


def test_build_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(torch.nn.Linear(1, 1), "sgd", 1e-3, 0.0)
