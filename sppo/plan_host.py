"""The trainer nodes' host RAM and the run directory's disk: the memory plan's second half
(`sppo.plan` sizes the devices and calls `trainer_host` for the trainer).

Formulas (bytes; P parameters, N = trainer.num_workers, k trainer ranks per node, d the
checkpoint's dtype bytes (config.json's), V x h the largest tensor (the embedding), B the
weight-sync bucket (`weight_sync.bucket_mb`), C = `sppo.config.CHECKPOINT_CHUNK_BYTES`, R rounds):
- load, per rank: the checkpoint's pages of its shard (read through mmap) d P / N and one
  tensor's read buffer 4 V h; on CPU also its fp32 shard 4 P / N (on a GPU the shard is on the
  device: not run on a GPU). Measured by bench/train.py on CPU: within a few % of each rank's
  peak (a 125M Llama, fp32 file).
- end of a round, per rank, above what training holds (`actors.round_end`; its phases come one
  after the other, so the largest counts): the hand-off's buckets, on CPU only (on a GPU they
  stay on the device: not run on a GPU), 2 B (the one gathered and the one being sent); the
  Hugging Face write, its share of one output file min(C, d P) / N (torch.distributed.checkpoint's
  writer keeps it until written), then consolidation, one tensor read and written, 2 d V h; the
  training state, its share of one part min(C, 4 P) / N. Measured on CPU by
  tests/actors/test_round_end.py: the peak grows by well under a rank's shard as the model grows.
  The full gather it replaced held 4 P + d P on rank 0 (the fp32 model and its cast copy).
- per node: k times the per-rank figure (on CPU plus what training holds, `sppo.plan`'s
  trainer total); checked against `run.trainer_node_memory_gb` (or the trainer nodes' memory
  at launch).
- disk in `run.output_dir`, per round: the checkpoint kept, d P (hf/) + 4 P (state/), plus d P
  while it is written (hf/.shards/, removed once consolidated); every round's is kept: R (d + 4) P
  for the run. Nothing is written elsewhere on the trainer nodes.

Not here: the devices (`sppo.plan`), reading the cluster (`cluster.launch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sppo.config import CHECKPOINT_CHUNK_BYTES, Config
from sppo.model_facts import ModelFacts

__all__ = ["TrainerHost", "trainer_host"]


@dataclass
class TrainerHost:
    """The trainer's host RAM (per rank and per node) and the run directory's disk."""

    ranks_per_node: int
    load: float  # per rank
    end_of_round: float  # per rank, above what training holds
    training: float  # per rank, what training holds in host RAM (CPU training; 0 on GPUs)
    full_gather: float  # rank 0's extra at the end of a round the old way, for comparison
    disk_round: float  # one round's checkpoint, kept
    disk_writing: float  # one round's checkpoint while it is written
    rounds: int
    node_memory: Optional[float] = None  # bytes, None: unknown (not checked)
    disk_free: Optional[float] = None  # bytes free in run.output_dir, None: not checked
    problems: list[str] = field(default_factory=list)

    @property
    def node_load(self) -> float:
        return self.ranks_per_node * self.load

    @property
    def node_end(self) -> float:
        return self.ranks_per_node * (self.training + self.end_of_round)

    def lines(self, fmt) -> list[str]:
        k = self.ranks_per_node
        out = [f"trainer host RAM per node ({k} rank{'s' if k > 1 else ''} per node), "
               "model data only:",
               f"  {'load':<14} {fmt(self.load):>10} per rank x {k} = {fmt(self.node_load):>10}",
               f"  {'end of round':<14} {fmt(self.training + self.end_of_round):>10} per rank "
               f"x {k} = {fmt(self.node_end):>10}  (the round's end adds "
               f"{fmt(self.end_of_round)}; a full gather on rank 0 would add "
               f"{fmt(self.full_gather)})"]
        if self.node_memory is not None:
            need = max(self.node_load, self.node_end)
            out.append(f"  {'available':<14} {fmt(self.node_memory):>10} per node: "
                       + ("fits" if need <= self.node_memory else "DOES NOT FIT"))
        out += ["disk in run.output_dir:",
                f"  {'per round':<14} {fmt(self.disk_round):>10} kept (hf/ + state/), "
                f"{fmt(self.disk_writing)} while written; {self.rounds} rounds: "
                f"{fmt(self.rounds * self.disk_round)}"]
        if self.disk_free is not None:
            out.append(f"  {'free':<14} {fmt(self.disk_free):>10}")
        return out


def trainer_host(cfg: Config, m: ModelFacts, *, training: float, ranks_per_node: int,
                 node_memory: Optional[float], disk_free: Optional[float], fmt) -> TrainerHost:
    """The trainer's host figures for `cfg` (see the module docstring); `training` is what a
    rank holds in host RAM while it trains (the plan's trainer total on CPU, 0 on GPUs);
    `fmt` formats bytes for the problems' text."""
    t = cfg.trainer
    n, p, d, gpu = t.num_workers, m.params, m.checkpoint_dtype_bytes, t.use_gpu
    largest = m.vocab * m.hidden
    load = d * p / n + 4 * largest + (0 if gpu else 4 * p / n)
    buckets = 0 if gpu else 2 * cfg.weight_sync.bucket_mb * 2**20
    end = max(buckets, min(CHECKPOINT_CHUNK_BYTES, d * p) / n, 2 * d * largest,
              min(CHECKPOINT_CHUNK_BYTES, 4 * p) / n)
    host = TrainerHost(ranks_per_node=ranks_per_node, load=load, end_of_round=end,
                       training=0.0 if gpu else training, full_gather=(4 + d) * p,
                       disk_round=(d + 4) * p, disk_writing=(2 * d + 4) * p,
                       rounds=cfg.run.rounds, node_memory=node_memory, disk_free=disk_free)
    if node_memory is not None:
        for what, need in (("the load", host.node_load), ("the end of a round", host.node_end)):
            if need > node_memory:
                host.problems.append(
                    f"trainer: each trainer node needs {fmt(need)} of host RAM at {what} "
                    f"({ranks_per_node} ranks x {fmt(need / ranks_per_node)}), "
                    f"{fmt(node_memory)} available (run.trainer_node_memory_gb): raise "
                    "trainer.num_workers (smaller shards) or put fewer ranks on a node")
                break
    if disk_free is not None and host.disk_writing > disk_free:
        host.problems.append(
            f"run.output_dir: one round's checkpoint needs {fmt(host.disk_writing)} while it "
            f"is written, {fmt(disk_free)} free: point run.output_dir at a larger volume")
    return host
