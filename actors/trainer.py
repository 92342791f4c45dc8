"""The SPPO trainer: one Ray Train `TorchTrainer` run for the whole job, FSDP2 workers.

`TrainerRun` (driver side) starts `TorchTrainer.fit()` once, in a background thread, and the
workers then train round after round, keeping the model in memory between rounds. The driver
talks to them only through the `actors.stream.TrainStream` actor:

    stream = create_stream(...); run = TrainerRun(..., stream=stream).start()
    for t in rounds:
        stream.begin_round.remote(t, expected_rows)     # producers put(t, rows), end_round(t)
        result = run.wait_round_done(t)                 # RoundResult: report, hand-off, checkpoint
    run.finish()

Each worker (`train_loop_per_worker`): builds the model sharded with FSDP2 without ever holding
it whole and fills its shards from the checkpoint (`actors.sharded_model`: meta device, each
rank reads its own slices of the safetensors files; bf16 `MixedPrecisionPolicy` on GPU, full
precision on CPU unless asked), builds the frozen reference the same way in the compute dtype
(filled from the policy's shards, never read from disk), resumes from
`ray.train.get_checkpoint()` if the run restarted, then per round: refreshes the reference from
the policy (or uses the generator's sampled-token log-probs), builds a fresh optimizer and
schedule (`sppo.optim`), and takes the steps the stream hands out (`actors.train_step`).
Round reports carry every rank's peak host memory over the load and the round (and peak device
memory on GPU). At the end of the round all ranks gather the full weights
(`get_model_state_dict`, FSDP2: the FSDP1 cpu-offload gather segfaults on CPU), rank 0 writes
`<checkpoint>/hf` (`save_pretrained` weights + tokenizer), all ranks write their shard of the
training state (`<checkpoint>/state`, torch.distributed.checkpoint) and call
`ray.train.report` (a barrier: every rank, once per round), and rank 0 hands the weights to the
driver through `hand_off` (`actors.weights`: the collective sync or the object store, default
`ObjectStoreHandOff`).

Exact resume is at round boundaries: the optimizer and schedule are fresh each round and the
reference is the round-start policy, so the model weights are the whole training state. A round
cut short by a failure is retrained from its start (the stream rewinds it); its report says what
was redone (`worker_restarts`, `steps_redone`, `rows_redone`). A round already handed to the
driver is never retrained: if Ray Train restored an older checkpoint (a rank died before the
controller registered the newer one), the workers load that round's checkpoint instead.

Not here: one step (`actors.train_step`), building rows (`sppo.rows`), the losses
(`sppo.loss`), moving weights to generators (`actors.weights`), where the workers run (the
caller passes `label_selector`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from actors.sharded_model import (HostMemory, build_sharded, compute_dtype, copy_weights,
                                  load_checkpoint)
from actors.stream import RoundResult, RoundSpec
from actors.train_step import train_step
from actors.weights import HandOffResult
from actors.weights.object_store import ObjectStoreHandOff
from sppo.config import TrainerConfig
from sppo.optim import build_optimizer, build_scheduler, schedule_steps

__all__ = ["TrainerRun", "train_loop_per_worker"]

logger = logging.getLogger("sppo.trainer")

HandOff = Callable[[dict[str, torch.Tensor], int], HandOffResult]


# --------------------------------------------------------------------------- the model


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: rank 0 gets the full CPU state dict, the other ranks an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --------------------------------------------------------------------------- the worker loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function. config: `model_path` (str), `trainer` (TrainerConfig),
    `stream` (TrainStream handle), `hand_off` (callable run on rank 0 with the full weights)."""
    import ray
    import ray.train
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg: TrainerConfig = config["trainer"]
    stream, model_path, hand_off = config["stream"], config["model_path"], config["hand_off"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    memory, start = HostMemory(), time.perf_counter()
    policy = build_sharded(model_path, cfg, mesh, device, trainable=True)
    how = load_checkpoint(policy, model_path)
    # The reference is refreshed from the policy's shards at every round's start.
    reference = build_sharded(model_path, cfg, mesh, device, trainable=False) \
        if cfg.reference == "frozen" else None
    load_peak = memory.peak_increase()
    logger.info("rank %d: model loaded (%s) in %.1f s, host memory peak +%s GiB; reference %s",
                rank, how, time.perf_counter() - start,
                "?" if load_peak is None else f"{load_peak / 2**30:.2f}",
                "none (sampled)" if reference is None else f"in {compute_dtype(cfg)}")

    next_round, resumed = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            resumed = _load_training_state(policy, Path(ckpt_dir))
        resumed["checkpoint_path"] = checkpoint.path
        next_round = resumed["round_index"] + 1
        logger.info("rank %d resumed after round %d from %s", rank, next_round - 1,
                    checkpoint.path)
    control = [None, None, None]  # newer checkpoint, worker generation, hand over again
    if rank == 0:
        newer = ray.get(stream.newer_checkpoint.remote(next_round))
        control = [newer, *ray.get(stream.attach.remote(newer[0] + 1 if newer else next_round))]
    dist.broadcast_object_list(control, src=0)
    newer, generation, hand_over_again = control
    if newer is not None:  # Ray Train restored an older checkpoint than the last round done
        with ray.train.Checkpoint(newer[1]).as_directory() as ckpt_dir:
            _load_training_state(policy, Path(ckpt_dir))
        next_round = newer[0] + 1
        logger.info("rank %d caught up to round %d from %s", rank, newer[0], newer[1])
    if hand_over_again:  # the failure came between the checkpoint and round_done
        full = _full_state_dict(policy)
        if rank == 0:
            t = resumed["round_index"]
            report = {**resumed["report"], **ray.get(stream.round_redone.remote(t))}
            ray.get(stream.round_done.remote(RoundResult(
                t, report, hand_off(full, t), resumed["checkpoint_path"])))

    while True:
        spec = ray.get(stream.wait_round.remote(next_round))
        if spec is None:
            break
        report = _train_round(spec, policy, reference, cfg, stream, rank, generation, pad_id,
                              device, memory, load_peak)
        _end_round(spec.round_index, report, policy, tokenizer, model_path, stream, rank,
                   hand_off)
        next_round += 1
    close = getattr(hand_off, "close", None)  # e.g. the generators leave the weight group
    if rank == 0 and close is not None:
        close()


def _train_round(spec: RoundSpec, policy, reference, cfg: TrainerConfig, stream, rank: int,
                 generation: int, pad_id: int, device: torch.device,
                 memory: HostMemory, load_peak: Optional[int]) -> dict[str, Any]:
    import ray

    t = spec.round_index
    start = time.perf_counter()
    memory.reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if reference is not None:
        copy_weights(reference, policy)
    horizon, warmup = schedule_steps(spec.expected_rows, cfg.global_batch_size,
                                     cfg.schedule_epochs, cfg.warmup_ratio)
    optimizer = build_optimizer(policy, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, horizon, warmup)
    losses, tokens, step = [], 0, 0
    pending = stream.next_step.remote(t, rank, 0, generation)
    while (piece := ray.get(pending)) is not None:
        pending = stream.next_step.remote(t, rank, step + 1, generation)  # prefetch
        metrics = train_step(policy, reference, optimizer, scheduler, piece.rows,
                             piece.global_rows, cfg, pad_id, device)
        metrics.update(round=t, step=step, epoch=piece.epoch)
        losses.append(metrics["loss"])
        tokens += metrics["tokens"]
        if rank == 0:
            stream.log_step.remote(t, metrics)
            logger.info("round %d step %d: loss %.4g log_ratio %.4g grad_norm %.3g lr %.3g "
                        "%.0f tok/s", t, step, metrics["loss"], metrics["log_ratio"],
                        metrics["grad_norm"], metrics["lr"], metrics["tokens_per_s"])
        step += 1
    elapsed = time.perf_counter() - start
    report: dict[str, Any] = {"round_index": t, "schedule_horizon": horizon,
                              "schedule_warmup": warmup, "train_time_s": elapsed,
                              "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed else 0,
                              "loss_first": losses[0] if losses else math.nan,
                              "loss_last": losses[-1] if losses else math.nan,
                              "loss_mean": sum(losses) / len(losses) if losses else math.nan}
    report.update(_memory_report(memory, load_peak, device))
    if rank == 0:
        counts = ray.get(stream.round_counts.remote(t))
        report.update(ray.get(stream.round_redone.remote(t)))  # after a worker-group restart
        report.update({k: v for k, v in counts.items() if k != "dropped"})
        report.update({f"dropped_{k}": v for k, v in counts["dropped"].items()})
    return report


def _memory_report(memory: HostMemory, load_peak: Optional[int],
                   device: torch.device) -> dict[str, list[Optional[int]]]:
    """Collective: every rank's peak host memory over its load and over this round (bytes,
    above the process's resident size before the load), and on GPU its peak of allocated
    device memory in the round; lists in rank order."""
    mine = [load_peak, memory.peak_increase(),
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None]
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    out = {"host_peak_load_bytes": [r[0] for r in ranks],
           "host_peak_round_bytes": [r[1] for r in ranks]}
    if device.type == "cuda":
        out["device_peak_round_bytes"] = [r[2] for r in ranks]
    return out


def _end_round(t: int, report: dict[str, Any], policy, tokenizer, model_path: str, stream,
               rank: int, hand_off: HandOff) -> None:
    """Gather, checkpoint, report (all ranks), hand the weights to the driver (rank 0)."""
    import ray.train
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = _full_state_dict(policy)
    name = f"round-{t}"
    with tempfile.TemporaryDirectory(prefix=f"sppo-{name}-") as tmp:
        if rank == 0:
            _save_hf(full, tokenizer, model_path, Path(tmp) / "hf")
            (Path(tmp) / "round.json").write_text(json.dumps({"round_index": t,
                                                              "report": report}))
        dcp.save(get_model_state_dict(policy), checkpoint_id=os.path.join(tmp, "state"))
        ray.train.report(report if rank == 0 else {"round_index": t},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)
    path = ray.train.get_context().get_storage().build_checkpoint_path_from_name(name)
    if rank == 0:
        ray.get(stream.round_done.remote(RoundResult(t, report, hand_off(full, t), path)))


def _save_hf(full: dict[str, torch.Tensor], tokenizer, model_path: str, out: Path) -> None:
    """`save_pretrained` the gathered weights and the tokenizer, with the base model's config
    and dtype (training holds float32 master weights whatever the checkpoint's dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_path)
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):  # configs read from JSON may hold the name
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    shell.load_state_dict({k: v.to(dtype) for k, v in full.items()}, assign=True)
    try:
        shell.generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # the base model has no generation_config.json
        pass
    shell.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _load_training_state(policy, ckpt_dir: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(policy)
    dcp.load(state, checkpoint_id=str(ckpt_dir / "state"))
    set_model_state_dict(policy, state)
    return json.loads((ckpt_dir / "round.json").read_text())


# --------------------------------------------------------------------------- driver side


class TrainerRun:
    """Starts the job's one `TorchTrainer.fit()` in a background thread and watches it.

    `stream` is the `TrainStream` handle the driver created; rounds are driven through it.
    `storage_path`/`name` are the Ray Train run's: re-running with the same pair resumes from
    the last round checkpoint (`<storage_path>/<name>/round-<t>`). `label_selector` names the
    nodes every worker must run on (Ray Train V2 applies it to every worker's bundle), None
    for any.
    """

    def __init__(self, *, model_path: str, trainer: TrainerConfig, stream, storage_path: str,
                 name: str, hand_off: Optional[HandOff] = None,
                 label_selector: Optional[dict[str, str]] = None):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        scaling: dict[str, Any] = {"num_workers": trainer.num_workers,
                                   "use_gpu": trainer.use_gpu}
        if label_selector is not None:
            scaling["label_selector"] = label_selector
        self._stream = stream
        self._trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"model_path": model_path, "trainer": trainer, "stream": stream,
                               "hand_off": hand_off or ObjectStoreHandOff()},
            torch_config=TorchConfig(backend="nccl" if trainer.use_gpu else "gloo"),
            scaling_config=ScalingConfig(**scaling),
            run_config=RunConfig(
                name=name, storage_path=str(Path(storage_path).expanduser().resolve())
                if "://" not in storage_path else storage_path,
                failure_config=FailureConfig(max_failures=trainer.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=None)),
        )
        self._thread: Optional[threading.Thread] = None
        self._result = None
        self._error: Optional[BaseException] = None

    def start(self) -> "TrainerRun":
        self._thread = threading.Thread(target=self._fit, name="sppo-trainer-fit", daemon=True)
        self._thread.start()
        return self

    def _fit(self) -> None:
        try:
            self._result = self._trainer.fit()
        except BaseException as exc:  # re-raised in the driver's thread by the methods below
            self._error = exc
            # Unblock producers waiting in put() and anyone waiting on the stream.
            self._stream.abort.remote(f"{type(exc).__name__}: {exc}"[:2000])

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_round_done(self, round_index: int, timeout_s: Optional[float] = None,
                        poll_s: float = 1.0,
                        producers_idle_s: Optional[float] = 30.0) -> RoundResult:
        """Block until rank 0 reports round `round_index`; raise if the run dies first, or if
        the round cannot finish: its producers never called `end_round`, and none has called
        `put` for `producers_idle_s` seconds (`TrainStream.stalled`; the error says what is
        missing). Callers end the round before waiting, as the driver does, so this only
        catches a forgotten `end_round`; one whose producers run alongside with longer gaps
        passes a longer time, or None to wait regardless."""
        import ray

        ref = self._stream.wait_round_done.remote(round_index)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            ready, _ = ray.wait([ref], timeout=poll_s)
            if ready:
                return ray.get(ref)
            if not self.running():
                raise RuntimeError(f"the trainer run ended before round {round_index} was "
                                   f"done") from self._error
            if producers_idle_s is not None and (why := ray.get(
                    self._stream.stalled.remote(round_index, producers_idle_s))):
                raise RuntimeError(why)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"round {round_index} not done after {timeout_s} s")

    def finish(self, timeout_s: Optional[float] = None):
        """Stop the workers after the rounds begun so far; returns the `ray.train.Result`."""
        import ray

        ray.get(self._stream.finish.remote())
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"the trainer run did not stop within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self._result
