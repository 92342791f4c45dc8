"""Streaming round vs the same stages one after another.

It runs the demo's components (HF generators, the Python judge, 2 FSDP2 trainer workers on
gloo, collective weight sync) on a local Ray cluster and alternates rounds of two shapes on
equal-size prompt shards:
- streaming: `cluster.pipeline.RoundPipeline` (generate, judge and train overlap);
- sequential: generate every prompt, then judge every generation, then train on every row
  (the official pipeline's shape, through files there, in memory here).
It prints the streaming round's time against the slowest stage's busy time measured in the
sequential rounds (target: within 1.25x) and against the sequential round.

Weight-sync bandwidth (transports and the update into vLLM generators) is `bench/weights.py`.

    .venv/bin/python bench/pipeline.py [--rounds 6] [--prompts 32]
    .venv/bin/python bench/pipeline.py --smoke   # CI: 2 rounds of 8 prompts
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

from sppo.config import load_config  # noqa: E402
from sppo.driver import DEMO_CONFIG  # noqa: E402
from cluster.pipeline import screen_generation  # noqa: E402
from sppo.records import Annotated, Generation  # noqa: E402
from sppo.rows import rows_from_annotated  # noqa: E402
from cluster.selfplay import SelfPlay  # noqa: E402


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
    for i in range(0, len(rows), job.cfg.trainer.global_batch_size):
        ray.get(job.stream.put.remote(t, rows[i:i + job.cfg.trainer.global_batch_size]))
    with job.generators.hold_resizes():  # as in SelfPlay.round: name the receivers, end, sync
        if job.sync_method == "collective":
            ray.get(job.stream.set_sync_targets.remote(t, job.generators.actors()))
        ray.get(job.stream.end_round.remote(t))
        result = job.trainer.wait_round_done(t)
        stages["train"] = time.perf_counter() - t2
        checkpoint = str(Path(result.checkpoint_path) / "hf")
        written = lambda: job.trainer.wait_checkpoint(t)  # noqa: E731
        if job.sync_method == "collective":
            job.generators.mark_synced(t + 1, checkpoint, written)
            job.generators.ensure_synced()
        else:
            job.generators.broadcast_buckets(result.hand_off.buckets, t + 1, checkpoint, written)
    job.trainer.wait_checkpoint(t)
    stages["round"] = time.perf_counter() - t0
    return stages


def streaming_round(job: SelfPlay, t: int) -> dict:
    """`SelfPlay.round` itself: its report's end of the round with it."""
    t0 = time.perf_counter()
    report = job.round(t)
    outcome = report["prompts"]
    end = report["end_of_round"]
    return {"round": time.perf_counter() - t0, "generate_busy": outcome["generate_busy_s"],
            "judge_busy": outcome["judge_busy_s"], "gather": end["gather_s"],
            "send": end["send_s"], "to_generators": end["to_generators_s"]}


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
                stream_t.append(streaming_round(job, t))
                print(f"round {t} streaming : {stream_t[-1]}")
            else:
                seq.append(sequential_round(job, t, shard))
                print(f"round {t} sequential: {seq[-1]}")
        job.record_checkpoints(wait=True)
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
    ends = stream_t[1:] or stream_t
    to_gen = sum(s["to_generators"] for s in ends) / len(ends)
    moved = sum(s["gather"] + s["send"] for s in ends) / len(ends)
    print(f"end of round: last step to every generator at t+1 {to_gen:.3f} s, gather + send "
          f"{moved:.3f} s: {to_gen / moved:.2f}x (target <= 1.2x; the checkpoint is written after)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--prompts", type=int, default=32, help="prompts per round")
    p.add_argument("--smoke", action="store_true",
                   help="2 rounds of 8 prompts: the code path quickly (tests/bench)")
    if p.parse_known_args()[0].smoke:  # flags given explicitly still win
        p.set_defaults(rounds=2, prompts=8)
    args = p.parse_args()
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        bench_rounds(args.rounds, args.prompts, tmp)
    ray.shutdown()


if __name__ == "__main__":
    main()
