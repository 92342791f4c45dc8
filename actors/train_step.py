"""One optimizer step of the SPPO trainer on one rank, and the forward pass it is made of.

- `response_logps(model, batch)`: summed log-probabilities of each row's response tokens;
- `plan_micro_batches(rows, cfg, device)`: this rank's micro-batches for one step, the ranks
  agreeing on their number of passes (every pass is collective under FSDP);
- `train_step(...)`: gradients accumulated over the micro-batches, scaled so the update equals
  that of one process on the whole global batch, then clipped and stepped.

Collective functions: every rank calls them together. Not here: the round loop, checkpoints and
the hand-off of weights (`actors.trainer`), the losses themselves (`sppo.loss`).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from sppo.config import TrainerConfig
from sppo.loss import compute_loss, sequence_logps
from sppo.rows import Batch, collate, micro_batches, token_micro_batches

__all__ = ["response_logps", "plan_micro_batches", "train_step"]


def response_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(N,) summed log-probabilities of each row's response tokens under `model` (one forward
    pass over the padded batch; `sppo.loss.sequence_logps` does the sum)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   use_cache=False).logits  # (N, T, V)
    return sequence_logps(logits, batch.input_ids, batch.response_mask)  # (N,)


def plan_micro_batches(rows, cfg: TrainerConfig, device: torch.device) -> list[list]:
    """This rank's micro-batches for one step; collective (all ranks call it together).

    `micro_batch_tokens` > 0: rows packed up to that many padded tokens
    (`sppo.rows.token_micro_batches`); else `micro_batch_size` rows each. Every FSDP rank must
    run the same number of forward/backward passes (each pass all-gathers and reduce-scatters
    with the others), so the ranks agree on the largest count and a rank with fewer splits its
    largest micro-batches up to it. The stream deals every rank the same number of rows, so
    that is always possible (and checked, on all ranks at once).
    """
    if cfg.micro_batch_tokens > 0:
        mbs = token_micro_batches(rows, cfg.micro_batch_tokens)
    else:
        mbs = micro_batches(rows, cfg.micro_batch_size)
    # One all-reduce: the largest pass count, and the most and fewest rows of any rank.
    stats = torch.tensor([len(mbs), len(rows), -len(rows)], device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    n, most, fewest = int(stats[0]), int(stats[1]), -int(stats[2])
    if most != fewest:  # raised on every rank together: none is left in a collective
        raise RuntimeError(f"ranks were dealt {fewest} to {most} rows for one step; the "
                           "stream deals each the same number")
    if n > len(mbs):  # token budgets only: equal rows make equal fixed-size counts
        mbs = token_micro_batches(rows, cfg.micro_batch_tokens, count=n)
    return mbs


def train_step(policy, reference, optimizer, scheduler, rows, global_rows: int,
               cfg: TrainerConfig, pad_id: int, device: torch.device) -> dict[str, float]:
    """One optimizer step over this rank's `rows`; collective (all ranks call it together).

    Each micro-batch's summed loss is scaled by world / global_rows: FSDP averages gradients
    over ranks, so the update is that of the mean loss over the whole global batch, however
    the rows are split into micro-batches (`plan_micro_batches`).
    """
    world = dist.get_world_size()
    start = time.perf_counter()
    policy.train()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, ratio, target, rows, tokens
    for rows_mb in plan_micro_batches(rows, cfg, device):
        batch = collate(rows_mb, pad_id).to(device)
        b = batch.num_rows
        logps = response_logps(policy, batch)  # (N,), N = B or 2B
        if reference is not None:
            with torch.no_grad():
                ref = response_logps(reference, batch)
            ref_c, ref_r = ref[:b], (ref[b:] if batch.is_pair else None)
        else:
            ref_c, ref_r = batch.ref_chosen, batch.ref_rejected
        loss, stats = compute_loss(
            cfg.loss, policy_chosen=logps[:b], ref_chosen=ref_c, p_chosen=batch.p_chosen,
            policy_rejected=logps[b:] if batch.is_pair else None, ref_rejected=ref_r,
            p_rejected=batch.p_rejected, eta=cfg.eta, beta=cfg.beta)
        (loss.sum() * (world / global_rows)).backward()
        sums += torch.stack([loss.detach().sum().double(), stats["log_ratio"].double() * b,
                             stats.get("target", torch.zeros(())).double().to(device) * b,
                             torch.tensor(b, dtype=torch.float64, device=device),
                             torch.tensor(batch.num_tokens, dtype=torch.float64, device=device)])
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(sums)
    loss_sum, ratio_sum, target_sum, n, tokens = sums.tolist()
    elapsed = time.perf_counter() - start
    out = {"loss": loss_sum / n, "log_ratio": ratio_sum / n, "grad_norm": float(grad_norm),
           "lr": lr, "rows": int(n), "tokens": int(tokens), "tokens_per_s": tokens / elapsed,
           "step_time_s": elapsed}
    if cfg.loss in ("sppo", "sppo_hard"):
        out["target"] = target_sum / n
    return out
