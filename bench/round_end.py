"""The end of a round, the old way and the new way, side by side in one run.

    python bench/round_end.py                 # 2 CPU ranks (gloo), the ~126M Llama of bench/train.py
    python bench/round_end.py --smoke         # CI: the "small" Llama

Each way runs its ranks as fresh processes (tests/actors/round_end_rank.py: the sharded model
filled from a bf16 checkpoint, every shard moved as training would, then the end of the round),
so each rank's peak host memory over the end of the round is its own (the modules the end of
the round imports are imported before it is measured: a run imports them once):
- full gather (before issue 22): rank 0 gathers the whole model in fp32, writes
  `save_pretrained` from it, every rank writes its training state, then rank 0 hands the
  weights over;
- streamed (`actors.round_end`): every rank gathers one bucket at a time from the shards and
  rank 0 hands it over at once; the checkpoint is written after, without a full gather.

The hand-off's receiver keeps one checksum per tensor (it stands in for the generators: the
transports are `bench/weights.py`'s). Figures: each rank's peak over the end of the round in
units of (the model's fp32 bytes / world size: one rank's share of the master weights), until
the weights were handed over and over the whole end of the round (the write included: its
peak counts the file pages the writer and the consolidation map, which the kernel can reclaim),
the time from the end of training to the weights handed over ("to t+1": the generators' wait),
and the checkpoint's write time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

RANK = REPO / "tests" / "actors" / "round_end_rank.py"


def run_ranks(model: str, mode: str, out: Path, world: int, chunk_mb: float) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(RANK), str(r), str(world), str(port), model,
                               mode, str(out), str(chunk_mb), "warm"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        for r, p in enumerate(procs):
            log, _ = p.communicate(timeout=1800)
            if p.returncode:
                raise SystemExit(f"{mode} rank {r} failed:\n{log[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="126m", choices=["small", "126m", "0.5b"])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--chunk-mb", type=float, default=64.0,
                   help="weight-sync buckets, Hugging Face files and training-state parts")
    p.add_argument("--smoke", action="store_true", help="the small Llama (tests/bench)")
    if p.parse_known_args()[0].smoke:
        p.set_defaults(model_size="small", chunk_mb=1.0)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from train import model_dir  # bench/train.py's seeded Llama configs

    with tempfile.TemporaryDirectory() as tmp:
        # bf16 on disk, as published checkpoints are (the HF checkpoint keeps that dtype)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        fp32 = model_dir(args.model_size, Path(tmp))
        model = str(Path(tmp) / "bf16")
        m = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32)
        params = sum(t.numel() for t in m.state_dict().values())
        m.to(torch.bfloat16).save_pretrained(model)
        AutoTokenizer.from_pretrained(fp32).save_pretrained(model)
        del m
        share = 4 * params / args.world
        print(f"model: {args.model_size} Llama, {params / 1e6:.0f}M parameters, fp32 "
              f"{4 * params / 2**20:.0f} MiB; {args.world} ranks (gloo, CPU); buckets, files and "
              f"parts of {args.chunk_mb:g} MiB; peak in units of fp32 bytes / world = "
              f"{share / 2**20:.0f} MiB")
        results = {mode: run_ranks(model, mode, Path(tmp) / mode, args.world, args.chunk_mb)
                   for mode in ("full_gather", "streamed")}
    print(f"{'':<12} {'rank':>4} {'peak until t+1':>15} {'peak':>6} {'to t+1 s':>9} "
          f"{'write s':>8}   (peaks / share)")
    for mode, ranks in results.items():
        for r in ranks:
            print(f"{mode:<12} {r['rank']:>4} {r['peak_to_generators'] / share:>15.2f} "
                  f"{r['peak_increase'] / share:>6.2f} {r['to_generators_s']:>9.2f} "
                  f"{r['write_s']:>8.2f}")
    old, new = results["full_gather"], results["streamed"]
    print(f"streamed / full gather: rank 0 peak {new[0]['peak_increase'] / old[0]['peak_increase']:.2f}x, "
          f"time to t+1 {new[0]['to_generators_s'] / old[0]['to_generators_s']:.2f}x, "
          f"write {new[0]['write_s'] / old[0]['write_s']:.2f}x")
    print(f"streamed hand-off: gather {new[0]['hand_off']['gather_s']:.2f} s + send "
          f"{new[0]['hand_off']['send_s']:.2f} s; time to t+1 "
          f"{new[0]['to_generators_s']:.2f} s")


if __name__ == "__main__":
    main()
