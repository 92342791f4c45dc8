"""actors/trainer.py: FSDP2 workers on a real local Ray cluster (2 CPU workers, gloo, tiny Llama).

One `TorchTrainer` run serves the module: two rounds driven through the stream actor exactly
as the driver does, then `finish()`. Round 0 streams 11 rows with a global batch of 4 over 2
ranks (steps of 4, 4 and 2 rows; 1 row dropped), round 1 streams 4 rows three times. Rank 0
fails on purpose once, after round 0 was handed over and before its checkpoint was written
(while the driver has already begun round 1): the worker group restarts (`FailureConfig`),
starts again from the base model, trains round 0 again for its checkpoint only (no second
hand-off) and goes on with round 1. The tests then check that run against a one-process,
plain-torch loop over the same global batches (sharding and the restart proven, not assumed),
the loss curve, the counts, and the checkpoints.

The last tests call `train_step` in this process on a 1-rank gloo group, to cover the other
losses, selection `all` and the sampled reference cheaply.
"""

from __future__ import annotations

import copy
import random
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from actors.round_end import checkpoint_complete
from actors.stream import create_stream
from actors.train_step import train_step
from actors.trainer import TrainerRun
from actors.weights.object_store import arrays_to_state_dict
from sppo.config import TrainerConfig
from sppo.loss import compute_loss, sequence_logps
from sppo.optim import build_optimizer, build_scheduler, schedule_steps
from sppo.records import TrainRow
from sppo.rows import collate, deal_to_ranks, token_micro_batches

# eta small and AdamW at 1e-3 so that weights visibly move and the loss falls step by step.
# Micro-batches by tokens: a budget of 56 padded tokens packs one or two of these rows (pairs
# of 5-18 tokens per sequence), so ranks with the same number of rows need different numbers
# of forward passes and must agree on one (`plan_micro_batches`).
CFG = TrainerConfig(num_workers=2, optimizer="adamw", lr=1e-3, eta=20.0, warmup_ratio=0.0,
                    schedule_epochs=100.0, global_batch_size=4, micro_batch_tokens=56,
                    max_grad_norm=1.0, max_length=24, stream_buffer=8, max_failures=1)


def _rows(n: int, seed: int, pair: bool = True) -> list[TrainRow]:
    rng = random.Random(seed)
    tok = lambda lo, hi: [rng.randrange(10, 500) for _ in range(rng.randint(lo, hi))]  # noqa
    out = []
    for i in range(n):
        out.append(TrainRow(prompt_id=f"s{seed}-{i}", prompt_ids=tok(3, 8), chosen_ids=tok(2, 10),
                            chosen_p=rng.uniform(0.5, 1.0),
                            rejected_ids=tok(2, 10) if pair else [],
                            rejected_p=rng.uniform(0.0, 0.5) if pair else 0.0,
                            chosen_ref_logp=rng.uniform(-60, -20),
                            rejected_ref_logp=rng.uniform(-60, -20) if pair else None))
    return out


ROUNDS = [(_rows(11, seed=0), 11), (_rows(4, seed=1) * 3, 12)]


@pytest.fixture(scope="module")
def run(ray_cluster, tiny_llama_dir, tmp_path_factory):
    ray = ray_cluster
    stream = create_stream(world_size=CFG.num_workers, global_batch_size=CFG.global_batch_size,
                           buffer_rows=CFG.stream_buffer, epochs=CFG.epochs,
                           max_length=CFG.max_length, selection=CFG.selection,
                           reference=CFG.reference)
    storage = tmp_path_factory.mktemp("trainer-runs")
    failed, fetched = str(storage / "failed-once"), str(storage / "buckets-fetched")

    def fail_once_while_writing(stage, round_index, rank):  # nested: pickled by value
        import os
        import time

        if (stage, round_index, rank) == ("handed_over", 0, 0) and not os.path.exists(failed):
            # Once the test holds the handed-over buckets (they die with this process).
            deadline = time.monotonic() + 120
            while not os.path.exists(fetched) and time.monotonic() < deadline:
                time.sleep(0.05)
            open(failed, "w").close()
            raise RuntimeError("injected failure after round 0's hand-over, before its "
                               "checkpoint")

    trainer = TrainerRun(model_path=tiny_llama_dir, trainer=CFG, stream=stream,
                         storage_path=str(storage), name="two-rounds",
                         fault_hook=fail_once_while_writing).start()
    out = SimpleNamespace(results=[], metrics=[], weights=[], fit=None, stalled=None,
                          written=[], root=trainer.checkpoint_root)
    try:
        for t, (rows, expected) in enumerate(ROUNDS):
            ray.get(stream.begin_round.remote(t, expected))
            ray.get(stream.put.remote(t, rows))
            if t == 1:  # waiting before end_round (bench/pipeline.py once did): reported
                try:
                    trainer.wait_round_done(t, timeout_s=120, poll_s=0.2, producers_idle_s=1.0)
                except Exception as exc:  # checked by its test; the round goes on below
                    out.stalled = exc
            ray.get(stream.end_round.remote(t))
            result = trainer.wait_round_done(t, timeout_s=600)
            out.results.append(result)
            out.weights.append(arrays_to_state_dict(ray.get(result.hand_off.buckets)))
            Path(fetched).touch()
            out.metrics.append(ray.get(stream.step_metrics.remote(t)))
        out.written = [trainer.wait_checkpoint(t, timeout_s=600) for t in range(len(ROUNDS))]
        out.fit = trainer.finish(timeout_s=300)
    finally:
        if trainer.running():
            ray.get(stream.finish.remote())
        ray.kill(stream)
    out.failed_once = Path(failed).exists()
    return out


def _global_batches(rows, gbs: int, world: int):
    """The stream's rule: arrival order, full batches, the tail rounded down to the world."""
    batches = [rows[i:i + gbs] for i in range(0, len(rows), gbs)]
    tail = len(batches[-1]) - len(batches[-1]) % world
    return batches[:-1] + ([batches[-1][:tail]] if tail else [])


def _logps(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return sequence_logps(logits, batch.input_ids, batch.response_mask)


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir):
    """Plain torch, one process, whole global batches: per-step loss and gradient norm, and
    the weights after each round."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pad = AutoTokenizer.from_pretrained(tiny_llama_dir).pad_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    after, metrics = [], []
    for rows, expected in ROUNDS:
        ref = copy.deepcopy(model).requires_grad_(False)
        opt = build_optimizer(model, CFG.optimizer, CFG.lr, CFG.weight_decay)
        sched = build_scheduler(opt, *schedule_steps(expected, CFG.global_batch_size,
                                                     CFG.schedule_epochs, CFG.warmup_ratio))
        metrics.append([])
        for rows_b in _global_batches(rows, CFG.global_batch_size, CFG.num_workers):
            batch, b = collate(rows_b, pad), len(rows_b)
            logps = _logps(model, batch)
            with torch.no_grad():
                ref_logps = _logps(ref, batch)
            loss, _ = compute_loss("sppo", policy_chosen=logps[:b], ref_chosen=ref_logps[:b],
                                   p_chosen=batch.p_chosen, policy_rejected=logps[b:],
                                   ref_rejected=ref_logps[b:], p_rejected=batch.p_rejected,
                                   eta=CFG.eta, beta=CFG.beta)
            loss.mean().backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CFG.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
            metrics[-1].append({"loss": loss.mean().item(), "grad_norm": norm.item()})
        after.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return SimpleNamespace(base=base, after=after, metrics=metrics)


def test_two_worker_fsdp_matches_one_process_training(run, one_process):
    """Same losses, gradient norms (before clipping) and weights as one process.

    AdamW and clipping are both blind to a wrong gradient scale, so the per-step gradient norm
    is compared too. Weights: AdamW divides each gradient element by its running RMS, which
    magnifies the rounding differences between FSDP's reduce-scatter and one process's
    backward for the few elements whose gradient is ~0. So every element must agree to 1e-4
    (a tenth of one step of lr 1e-3) and the mean difference must be below 1e-7, while the
    weights move by ~1e-3 on average: a sharding or scaling mistake shows as ~1e-3 differences.
    """
    for t in range(len(ROUNDS)):
        got_m, want_m = run.metrics[t], one_process.metrics[t]
        assert len(got_m) == len(want_m)
        for got, want in zip(got_m, want_m):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert any(m["grad_norm"] > CFG.max_grad_norm for m in got_m), "clipping exercised"

        got, want = run.weights[t], one_process.after[t]
        assert got.keys() == want.keys()
        diff = torch.cat([(got[k] - want[k]).abs().flatten() for k in want])
        moved = torch.cat([(want[k] - one_process.base[k]).abs().flatten() for k in want])
        assert moved.mean() > 5e-4, "the weights should visibly move"
        assert diff.mean() < 1e-7, f"round {t}: mean |diff| {diff.mean():.3g}"
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=0,
                                       msg=lambda m, k=k: f"round {t} {k}: {m}")


def test_token_budget_made_ranks_disagree_on_their_number_of_passes():
    """The equivalence above covers the agreement in `plan_micro_batches`: in some step of
    these rounds the two ranks' rows pack into different numbers of micro-batches."""
    counts = [[len(token_micro_batches(rank_rows, CFG.micro_batch_tokens))
               for rank_rows in deal_to_ranks(batch, CFG.num_workers)]
              for rows, _ in ROUNDS for batch in _global_batches(rows, CFG.global_batch_size,
                                                                  CFG.num_workers)]
    assert any(len(set(c)) > 1 for c in counts), counts
    assert any(max(c) > 1 for c in counts), counts  # and some rank packs more than one pass


def test_loss_falls_over_steps_on_repeated_rows(run):
    losses = [m["loss"] for m in run.metrics[1]]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    m = run.metrics[1][0]
    assert {"loss", "log_ratio", "target", "grad_norm", "lr", "tokens_per_s"} <= m.keys()


def test_round_with_uneven_row_count_ends_cleanly_and_counts_add_up(run):
    r0, r1 = run.results[0].report, run.results[1].report
    assert [m["rows"] for m in run.metrics[0]] == [4, 4, 2]
    assert (r0["rows_put"], r0["rows_trained"], r0["carried_over"]) == (11, 10, 0)
    assert r0["dropped_remainder_after_even_split"] == 1 and r0["steps"] == 3
    assert (r1["rows_put"], r1["rows_trained"], r1["steps"]) == (12, 12, 3)


def test_waiting_for_a_round_nobody_ends_raises_what_is_missing(run):
    """Round 1's rows were all put but `end_round(1)` not yet called when the driver waited:
    the wait failed naming that, and the round then finished as usual once ended (the other
    tests check round 1's steps and weights)."""
    assert isinstance(run.stalled, RuntimeError), run.stalled
    assert re.fullmatch(r"round 1 cannot finish: end_round\(1\) was never called \(12 rows put, "
                        r"\d+ buffered; .*\) and no producer has put rows for \d+\.\d s",
                        str(run.stalled)), run.stalled
    assert run.results[1].report["rows_trained"] == 12


def test_two_rounds_in_one_run_fresh_optimizer_and_reference(run):
    assert run.failed_once  # and yet the weights match one process (test above)
    first = run.metrics[1][0]
    assert first["lr"] == CFG.lr  # a fresh schedule (no warmup here) starts at the peak
    assert abs(first["log_ratio"]) < 1e-4  # the reference was refreshed to the round start
    assert [r.round_index for r in run.results] == [0, 1]
    # Round 0 was trained again for its checkpoint after the failure, and handed over once.
    assert run.written[0]["worker_restarts"] == 1 and run.written[0]["rows_redone"] == 10
    # Round 1 may have begun before the restart (it is then counted), but had no step yet.
    assert run.written[1]["steps_redone"] == 0
    assert run.results[0].report["worker_restarts"] == 0


def test_round_checkpoint_loads_with_from_pretrained_and_gives_same_logits(run, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for t, result in enumerate(run.results):
        ckpt = Path(result.checkpoint_path)
        assert ckpt == run.root / f"round-{t}" == Path(run.written[t]["path"])
        assert checkpoint_complete(ckpt) and (ckpt / "state" / "parts.json").is_file()
        loaded = AutoModelForCausalLM.from_pretrained(ckpt / "hf")
        handed = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        handed.load_state_dict(run.weights[t])
        tok = AutoTokenizer.from_pretrained(ckpt / "hf")
        ids = torch.tensor([tok("hello good friend, tell me a story").input_ids])
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, handed(ids).logits, atol=0, rtol=0)


# ----------------------------------------------------------------- single-rank train_step


@pytest.fixture(scope="module")
def one_rank_group():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_a_quantised_checkpoint_is_refused_by_name(one_rank_group, tiny_llama_dir, tmp_path):
    """Its weights would load by name and shape, unscaled: refused before any read."""
    import json
    import shutil

    from actors.sharded_model import build_sharded, load_checkpoint

    shutil.copytree(tiny_llama_dir, tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    cfg = TrainerConfig(num_workers=1)
    policy = build_sharded(str(tmp_path / "fp8"), cfg, one_rank_group, torch.device("cpu"),
                           trainable=True)
    with pytest.raises(RuntimeError, match=r"a quantised checkpoint \(fp8\)"):
        load_checkpoint(policy, str(tmp_path / "fp8"))


@pytest.mark.parametrize("loss, selection, reference, checkpointing, reshard", [
    ("sppo", "all", "sampled", False, True), ("sppo_hard", "pair", "frozen", False, False),
    ("dpo", "pair", "sampled", False, True), ("ipo", "pair", "frozen", True, True)])
def test_train_step_other_losses_and_references(one_rank_group, tiny_llama_dir, loss,
                                                selection, reference, checkpointing, reshard):
    from actors.sharded_model import build_sharded, copy_weights, load_checkpoint

    cfg = TrainerConfig(num_workers=1, loss=loss, selection=selection, reference=reference,
                        optimizer="rmsprop", lr=1e-4, global_batch_size=4, micro_batch_size=2,
                        eta=20.0, activation_checkpointing=checkpointing,
                        reshard_after_forward=reshard)
    cpu = torch.device("cpu")
    policy = build_sharded(tiny_llama_dir, cfg, one_rank_group, cpu, trainable=True)
    assert load_checkpoint(policy, tiny_llama_dir) == "sharded_read"
    ref = None
    if reference == "frozen":
        ref = build_sharded(tiny_llama_dir, cfg, one_rank_group, cpu, trainable=False)
        copy_weights(ref, policy)
    rows = _rows(4, seed=2, pair=selection == "pair")
    before = {k: v.full_tensor().clone() for k, v in policy.state_dict().items()}

    # the loss the step reports = the plain computation on the whole batch before the update
    batch, b = collate(rows, 0), len(rows)
    with torch.no_grad():
        logps = _logps(policy, batch)
        ref_logps = _logps(ref, batch) if ref is not None else None
    # Without backward nothing reshards the blocks this no-grad forward gathered when
    # reshard_after_forward is off (the trainer never runs the policy so); reshard them.
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    pair = selection == "pair"
    want, _ = compute_loss(
        loss, policy_chosen=logps[:b],
        ref_chosen=ref_logps[:b] if ref is not None else batch.ref_chosen,
        p_chosen=batch.p_chosen, policy_rejected=logps[b:] if pair else None,
        ref_rejected=(ref_logps[b:] if ref is not None else batch.ref_rejected) if pair else None,
        p_rejected=batch.p_rejected, eta=cfg.eta, beta=cfg.beta)

    opt = build_optimizer(policy, cfg.optimizer, cfg.lr, cfg.weight_decay)
    sched = build_scheduler(opt, 10, 0)
    metrics = train_step(policy, ref, opt, sched, rows, 4, cfg, 0, torch.device("cpu"))
    assert metrics["loss"] == pytest.approx(want.mean().item(), rel=1e-5)
    assert metrics["rows"] == 4 and metrics["tokens"] == int(batch.attention_mask.sum())
    assert ("target" in metrics) == (loss in ("sppo", "sppo_hard"))
    after = {k: v.full_tensor() for k, v in policy.state_dict().items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)
