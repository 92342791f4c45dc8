"""Streaming round vs the same stages one after another; weight broadcast vs a memory copy.

Part 1 runs the demo's components (HF generators, the Python judge, 2 FSDP2 trainer workers on
gloo, collective weight sync) on a local Ray cluster and alternates rounds of two shapes on
equal-size prompt shards:
- streaming: `sppo.pipeline.RoundPipeline` (generate, judge and train overlap);
- sequential: generate every prompt, then judge every generation, then train on every row
  (the official pipeline's shape, through files there, in memory here).
It prints the streaming round's time against the slowest stage's busy time measured in the
sequential rounds (target: within 1.25x) and against the sequential round.

Part 2 broadcasts a state dict of `--mb` MiB from one Ray actor to `--receivers` actors over
the gloo group of `actors.weights` and compares its bandwidth with a plain in-process memory
copy of the same bytes (target: at least 30%).

    .venv/bin/python bench/pipeline.py [--rounds 4] [--prompts 32] [--mb 256] [--receivers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch  # noqa: E402

from actors.weights import CollectiveSender, WeightLayout, receive_collective  # noqa: E402
from sppo.config import load_config  # noqa: E402
from sppo.driver import DEMO_CONFIG  # noqa: E402
from sppo.pipeline import screen_generation  # noqa: E402
from sppo.records import Annotated, Generation  # noqa: E402
from sppo.rows import rows_from_annotated  # noqa: E402
from sppo.selfplay import SelfPlay  # noqa: E402


def sequential_round(job: SelfPlay, t: int, shard) -> dict:
    stages = {}
    t0 = time.perf_counter()
    ray.get(job.stream.begin_round.remote(t, len(shard)))
    job.generators.submit(shard)
    gens = [g for g in job.generators.drain() if isinstance(g, Generation)]
    gens = [g for g in gens if not screen_generation(g)]
    stages["generate"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    job.judges.submit(gens)
    judged = [a for a in job.judges.drain() if isinstance(a, Annotated)]
    stages["judge"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    rows = [r for a in judged for r in rows_from_annotated(a, job.cfg.trainer.selection)]
    ray.get(job.stream.set_sync_targets.remote(t, job.generators.actors()))
    for i in range(0, len(rows), job.cfg.trainer.global_batch_size):
        ray.get(job.stream.put.remote(t, rows[i:i + job.cfg.trainer.global_batch_size]))
    ray.get(job.stream.end_round.remote(t))
    result = job.trainer.wait_round_done(t)
    stages["train"] = time.perf_counter() - t2
    job._sync(t, result)
    stages["round"] = time.perf_counter() - t0
    return stages


def streaming_round(job: SelfPlay, t: int, shard) -> dict:
    t0 = time.perf_counter()
    outcome = job._stream_round(t, shard)
    result = job.trainer.wait_round_done(t)
    job._sync(t, result)
    return {"round": time.perf_counter() - t0, "generate_busy": outcome.generate_busy_s,
            "judge_busy": outcome.judge_busy_s}


def bench_rounds(rounds: int, prompts: int, out_dir: str) -> None:
    cfg = load_config(DEMO_CONFIG, [f"run.rounds={rounds}", f"data.max_prompts={rounds * prompts}",
                                    "data.eval_prompts=0", f"run.output_dir={out_dir}",
                                    "trainer.global_batch_size=4"])
    job = SelfPlay(cfg, Path(out_dir) / "bench")
    job.setup()
    stream_t, seq = [], []
    try:
        for t in range(rounds):
            shard = job.split.shards[t]
            if t % 2 == 0:
                stream_t.append(streaming_round(job, t, shard))
                print(f"round {t} streaming : {stream_t[-1]}")
            else:
                seq.append(sequential_round(job, t, shard))
                print(f"round {t} sequential: {seq[-1]}")
        job.trainer.finish(timeout_s=300)
    finally:
        job.generators.shutdown()
        job.judges.shutdown()
    # Round 0 pays the trainer's start-up (model load, FSDP wrap): leave it out when we can.
    s_rounds = [s["round"] for s in stream_t[1:]] or [s["round"] for s in stream_t]
    streaming = sum(s_rounds) / len(s_rounds)
    slowest = sum(max(s["generate"], s["judge"], s["train"]) for s in seq) / len(seq)
    sequential = sum(s["round"] for s in seq) / len(seq)
    print(f"\nstreaming round          {streaming:7.2f} s")
    print(f"sequential round         {sequential:7.2f} s  (stages: " + ", ".join(
        f"{k} {sum(s[k] for s in seq) / len(seq):.2f}s" for k in ("generate", "judge", "train"))
        + ")")
    print(f"slowest stage busy time  {slowest:7.2f} s")
    print(f"streaming / slowest stage = {streaming / slowest:.2f}x  (target <= 1.25x)")
    print(f"sequential / streaming    = {sequential / streaming:.2f}x")


class Receiver:
    def __init__(self, state_mb: float):
        self.state = {f"w{i}": torch.empty(int(state_mb * 2**20 / 4 / 8)) for i in range(8)}

    def load(self, bucket_refs):
        # The object-store path: buckets are mapped from shared memory, then copied in place.
        for bucket in ray.get(bucket_refs):
            for name, a in bucket.items():
                self.state[name].copy_(torch.from_numpy(a))
        return True

    def receive(self, address, rank, layout):
        for bucket in receive_collective(address, rank, layout):
            for name, t in bucket.items():
                self.state[name].copy_(t)
        return True


class Sender:
    def __init__(self, state_mb: float):
        self.state = {f"w{i}": torch.randn(int(state_mb * 2**20 / 4 / 8)) for i in range(8)}
        self.sender = CollectiveSender("gloo", timeout_s=600)

    def address(self, world):
        return self.sender.address(world)

    def layout(self, bucket_mb):
        return WeightLayout.from_named(self.state.items(), bucket_mb)

    def put(self, layout):
        from actors.weights import put_buckets

        t0 = time.perf_counter()
        refs = put_buckets(self.state, layout)
        return refs, time.perf_counter() - t0

    def send(self, layout, world):
        return self.sender.send(self.state, layout, world)


def bench_broadcast(mb: float, receivers: int, bucket_mb: float, repeats: int = 3) -> None:
    src = torch.randn(int(mb * 2**20 / 4))
    dst = torch.empty_like(src)
    copies = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    copy_bw = src.numel() * 4 / min(copies)
    del src, dst

    sender = ray.remote(Sender).options(num_cpus=0).remote(mb)
    recvs = [ray.remote(Receiver).options(num_cpus=0).remote(mb) for _ in range(receivers)]
    layout = ray.get(sender.layout.remote(bucket_mb))
    times = []
    for _ in range(repeats):
        world = receivers + 1
        address = ray.get(sender.address.remote(world))
        refs = [r.receive.remote(address, i + 1, layout) for i, r in enumerate(recvs)]
        t0 = time.perf_counter()
        stats = ray.get(sender.send.remote(layout, world))
        ray.get(refs)
        times.append(max(stats["seconds"], 1e-9))
    bw = layout.total_bytes / min(times)
    store_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        refs, _ = ray.get(sender.put.remote(layout))
        ray.get([r.load.remote(refs) for r in recvs])
        store_times.append(time.perf_counter() - t0)
        del refs
    store_bw = layout.total_bytes / min(store_times)
    print(f"\nbroadcast {layout.total_bytes / 2**20:.0f} MiB in {len(layout.buckets)} buckets to "
          f"{receivers} receiver(s): {bw / 1e9:.2f} GB/s per receiver")
    print(f"memory copy of the same bytes:           {copy_bw / 1e9:.2f} GB/s")
    print(f"object-store broadcast (put once, every receiver loads): {store_bw / 1e9:.2f} GB/s")
    print(f"collective broadcast / memory copy = {bw / copy_bw:.0%}  (target >= 30%)")
    print(f"object-store broadcast / memory copy = {store_bw / copy_bw:.0%}")
    for a in [sender, *recvs]:
        ray.kill(a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--prompts", type=int, default=32, help="prompts per round")
    p.add_argument("--mb", type=float, default=256.0, help="state dict size for the broadcast")
    p.add_argument("--receivers", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--skip-rounds", action="store_true")
    args = p.parse_args()
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_rounds:
            bench_rounds(args.rounds, args.prompts, tmp)
        bench_broadcast(args.mb, args.receivers, args.bucket_mb)
    ray.shutdown()


if __name__ == "__main__":
    main()
