"""The SPPO trainer: one Ray Train `TorchTrainer` run for the whole job, FSDP2 workers.

`TrainerRun` (driver side) starts `TorchTrainer.fit()` once, in a background thread, and the
workers then train round after round, keeping the model in memory between rounds. The driver
talks to them only through the `actors.stream.TrainStream` actor:

    stream = create_stream(...); run = TrainerRun(..., stream=stream).start()
    for t in rounds:
        stream.begin_round.remote(t, expected_rows)     # producers put(t, rows), end_round(t)
        result = run.wait_round_done(t)                 # RoundResult: the weights are handed over
        ...                                             # round t+1 may begin meanwhile
        run.wait_checkpoint(t)                          # round t's checkpoint is complete
    run.finish()

Each worker (`train_loop_per_worker`): asks the stream where to resume (`attach`: the latest
complete round checkpoint, or none), builds the model sharded with FSDP2 without ever holding
it whole and fills its shards from the base model (`actors.sharded_model`: meta device, each
rank reads its own slices of the safetensors files; bf16 `MixedPrecisionPolicy` on GPU, full
precision on CPU unless asked) or from that checkpoint's sharded training state, builds the
frozen reference the same way in the compute dtype (filled from the policy's shards, never
read from disk), then per round: refreshes the reference from the policy (or uses the
generator's sampled-token log-probs), builds a fresh optimizer and schedule (`sppo.optim`),
and takes the steps the stream hands out (`actors.train_step`). Round reports carry every
rank's peak host memory over the load and the round (and peak device memory on GPU).

The end of a round (`_RoundEnd`, `actors.round_end`), generators first and disk after: every
rank gathers the weights from its shards one bucket at a time and rank 0 hands each bucket to
`hand_off` (`actors.weights`: the collective sync or the object store, default
`ObjectStoreHandOff`), then tells the stream `handed_over`; the driver syncs and begins the
next round. Then every rank writes its share of the round's checkpoint in place into
`<checkpoint_root>/round-<t>` (`hf/`, which `from_pretrained` loads, in the model's dtype;
`state/`, the sharded fp32 weights; `round.json` last) and rank 0 tells the stream
`checkpoint_done`; the next round's rows gather in the stream meanwhile. No rank holds the
whole model at any point; no Ray Train checkpoint is reported (Ray Train would copy it).

Exact resume is at round boundaries: the optimizer and schedule are fresh each round and the
reference is the round-start policy, so the model weights are the whole training state. A
restarted worker group resumes from the latest complete checkpoint and trains every later
round again from its start (the stream rewinds them); a round that was already handed over is
trained again only for its checkpoint (not handed over twice). Reports say what was redone
(`worker_restarts`, `steps_redone`, `rows_redone`).

Not here: one step (`actors.train_step`), building rows (`sppo.rows`), the losses
(`sppo.loss`), moving weights to generators (`actors.weights`), where the workers run (the
caller passes `label_selector`).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from actors.round_end import checkpoint_dtype, read_state, stream_weights, write_checkpoint
from actors.sharded_model import (HostMemory, build_sharded, compute_dtype, copy_weights,
                                  load_checkpoint)
from actors.stream import RoundResult, RoundSpec
from actors.train_step import train_step
from actors.weights import HandOff
from actors.weights.object_store import ObjectStoreHandOff
from sppo.config import TrainerConfig
from sppo.optim import build_optimizer, build_scheduler, schedule_steps

__all__ = ["TrainerRun", "train_loop_per_worker"]

logger = logging.getLogger("sppo.trainer")


# --------------------------------------------------------------------------- the worker loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function. config: `model_path` (str), `trainer` (TrainerConfig),
    `stream` (TrainStream handle), `hand_off` (`actors.weights.HandOff`, rank 0 hands each
    bucket to it), `checkpoint_root` (round t's checkpoint goes to `<root>/round-<t>`)."""
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
    # The checkpoint's collectives go over gloo (a side group beside NCCL on GPU: not run on
    # a GPU); on CPU the default group is gloo already.
    files_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    control: list[Any] = [None, None]
    if rank == 0:
        control = list(ray.get(stream.attach.remote()))
    dist.broadcast_object_list(control, src=0)
    generation, resume = control
    memory, start = HostMemory(), time.perf_counter()
    policy = build_sharded(model_path, cfg, mesh, device, trainable=True)
    if resume is None:
        how = load_checkpoint(policy, model_path)
        next_round = 0
    else:  # the latest complete round checkpoint, written by `write_checkpoint`
        read_state(policy, Path(resume[1]), group=files_group)
        how, next_round = f"round {resume[0]}'s checkpoint {resume[1]}", resume[0] + 1
    # The reference is refreshed from the policy's shards at every round's start.
    reference = build_sharded(model_path, cfg, mesh, device, trainable=False) \
        if cfg.reference == "frozen" else None
    load_peak = memory.peak_increase()
    logger.info("rank %d: model loaded (%s) in %.1f s, host memory peak +%s GiB; reference %s",
                rank, how, time.perf_counter() - start,
                "?" if load_peak is None else f"{load_peak / 2**30:.2f}",
                "none (sampled)" if reference is None else f"in {compute_dtype(cfg)}")
    end = _RoundEnd(policy, hand_off, stream, rank, device, model_path, tokenizer,
                    Path(config["checkpoint_root"]), files_group, config.get("fault_hook"))
    while True:
        spec = ray.get(stream.wait_round.remote(next_round))
        if spec is None:
            break
        report = _train_round(spec, policy, reference, cfg, stream, rank, generation, pad_id,
                              device, memory, load_peak)
        end(spec, report, functools.partial(_complete_report, report, stream, rank, memory,
                                            load_peak, device))
        next_round += 1
    if rank == 0:
        hand_off.close()  # e.g. the generators leave the weight group


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
                              # wall clock of this rank's last step's end: the driver measures
                              # the time until every generator holds the round's weights
                              "last_step_at": time.time(),
                              "schedule_warmup": warmup, "train_time_s": elapsed,
                              "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed else 0,
                              "loss_first": losses[0] if losses else math.nan,
                              "loss_last": losses[-1] if losses else math.nan,
                              "loss_mean": sum(losses) / len(losses) if losses else math.nan}
    return report


def _complete_report(report: dict[str, Any], stream, rank: int, memory: HostMemory,
                     load_peak: Optional[int], device: torch.device) -> None:
    """Collective, after the round's weights were handed over: every rank's memory peaks
    (the hand-off's included) and, on rank 0, the stream's counts of the round."""
    import ray

    t = report["round_index"]
    report.update(_memory_report(memory, load_peak, device))
    if rank == 0:
        counts = ray.get(stream.round_counts.remote(t))
        report.update(ray.get(stream.round_redone.remote(t)))  # after a worker-group restart
        report.update({k: v for k, v in counts.items() if k != "dropped"})
        report.update({f"dropped_{k}": v for k, v in counts["dropped"].items()})


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


class _RoundEnd:
    """The end of a round on every rank: the weights streamed from the shards to the
    generators (`actors.round_end.stream_weights`; rank 0 then tells the stream
    `handed_over`, and the driver syncs, evaluates and begins the next round), then the
    round's checkpoint written into `<root>/round-<t>` (`write_checkpoint`; rank 0 then tells
    the stream `checkpoint_done`) while the next round's rows flow into the stream."""

    def __init__(self, policy, hand_off: HandOff, stream, rank: int, device: torch.device,
                 model_path: str, tokenizer, root: Path, group,
                 fault_hook: Optional[Callable[[str, int, int], None]] = None) -> None:
        self.policy, self.hand_off, self.stream, self.rank = policy, hand_off, stream, rank
        self.device, self.model_path, self.tokenizer = device, model_path, tokenizer
        self.root, self.group = root, group
        self.fault_hook = fault_hook or (lambda stage, round_index, rank: None)
        self.dtype = checkpoint_dtype(model_path)

    def __call__(self, spec: RoundSpec, report: dict[str, Any],
                 complete_report: Callable[[], None]) -> None:
        """`complete_report()` (collective) finishes the round's report once the weights are
        handed over: the generators do not wait for it."""
        import ray

        t = spec.round_index
        out = self.root / f"round-{t}"
        result = None
        if spec.hand_off:
            result, timings = stream_weights(self.policy, self.hand_off, round_index=t,
                                             device=self.device)
            # Wall clock: on the collective path every healthy generator holds t+1 now.
            report["end_of_round"] = {**timings, "handed_over_at": time.time()}
        complete_report()
        if spec.hand_off and self.rank == 0:
            ray.get(self.stream.handed_over.remote(RoundResult(t, report, result, str(out))))
        self.fault_hook("handed_over", t, self.rank)
        timings = write_checkpoint(self.policy, out, dtype=self.dtype,
                                   model_path=self.model_path, tokenizer=self.tokenizer,
                                   marker={"round_index": t, "report": report}, group=self.group)
        if self.rank == 0:
            ray.get(self.stream.checkpoint_done.remote(t, {"path": str(out), **timings}))
            logger.info("round %d checkpoint written to %s: %s", t, out, timings)


# --------------------------------------------------------------------------- driver side


class TrainerRun:
    """Starts the job's one `TorchTrainer.fit()` in a background thread and watches it.

    `stream` is the `TrainStream` handle the driver created; rounds are driven through it.
    `storage_path`/`name` are the Ray Train run's, and the workers write round t's checkpoint
    to `<storage_path>/<name>/round-<t>` (a directory every trainer node can write: shared
    storage on several nodes); a later run resumes from one when the driver names it
    (`TrainStream.mark_done`). `label_selector` names the
    nodes every worker must run on (Ray Train V2 applies it to every worker's bundle), None
    for any. `fault_hook(stage, round_index, rank)`, for tests, runs on every rank between the
    hand-over and the checkpoint (stage "handed_over"): a failure there is one during the
    write.
    """

    def __init__(self, *, model_path: str, trainer: TrainerConfig, stream, storage_path: str,
                 name: str, hand_off: Optional[HandOff] = None,
                 label_selector: Optional[dict[str, str]] = None,
                 fault_hook: Optional[Callable[[str, int, int], None]] = None):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        scaling: dict[str, Any] = {"num_workers": trainer.num_workers,
                                   "use_gpu": trainer.use_gpu}
        if label_selector is not None:
            scaling["label_selector"] = label_selector
        if "://" in storage_path:
            raise ValueError(f"storage_path {storage_path!r}: the workers write each round's "
                             "checkpoint in place, so it must be a directory every trainer "
                             "node can write (a shared filesystem on several nodes)")
        self._stream = stream
        self.checkpoint_root = Path(storage_path).expanduser().resolve() / name
        self._trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"model_path": model_path, "trainer": trainer, "stream": stream,
                               "hand_off": hand_off or ObjectStoreHandOff(),
                               "checkpoint_root": str(self.checkpoint_root),
                               "fault_hook": fault_hook},
            torch_config=TorchConfig(backend="nccl" if trainer.use_gpu else "gloo"),
            scaling_config=ScalingConfig(**scaling),
            run_config=RunConfig(
                name=name, storage_path=str(self.checkpoint_root.parent),
                failure_config=FailureConfig(max_failures=trainer.max_failures)),
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

    def wait_checkpoint(self, round_index: int, timeout_s: Optional[float] = None,
                        poll_s: float = 1.0) -> dict[str, Any]:
        """Block until round `round_index`'s checkpoint is complete (its `checkpoint_done`
        info: path and write timings); raise if the run dies first."""
        import ray

        ref = self._stream.wait_checkpoint.remote(round_index)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            ready, _ = ray.wait([ref], timeout=poll_s)
            if ready:
                return ray.get(ref)
            if not self.running():
                raise RuntimeError(f"the trainer run ended before round {round_index}'s "
                                   f"checkpoint was written") from self._error
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"round {round_index}'s checkpoint not written after "
                                   f"{timeout_s} s")

    def checkpoint_info(self, round_index: int) -> Optional[dict[str, Any]]:
        """Round `round_index`'s checkpoint info if it is complete, else None (no wait)."""
        import ray

        return ray.get(self._stream.checkpoint_info.remote(round_index))

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
