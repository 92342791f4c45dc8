"""Trainer throughput and memory: FSDP2 runs on the same rows, side by side.

    python bench/train.py                                   # CPU, gloo, 2 workers, ~126M Llama
    python bench/train.py --model-size tiny --workers 1 2 --micro rows:2   # 1 vs 2 workers
    python bench/train.py --device cuda --model-size 0.5b --workers 1 2 4 8   # GPU, bf16, NCCL
    python bench/train.py --smoke                           # CI: 16 short rows, 2 workers

Each variant (a worker count x a micro-batching: `rows:N`, N rows per forward pass, or
`tokens:N`, rows packed up to N padded tokens) gets its own `TorchTrainer` run with one SPPO
round (pair rows, frozen reference) over the same seeded synthetic rows and the same global
batches, driven through the stream actor exactly as the driver does. The first variant is the
baseline of the ratios. By default: fixed one-row micro-batches against the token budget.

Tokens are the non-padding tokens of the policy's forward pass (chosen and rejected
sequences); the rate is over the round's steps after the first (warm-up), from the per-step
metrics the workers report. On CUDA it also prints model FLOPs utilisation: 8 * parameters
FLOPs per token (policy forward + backward = 6N, reference forward = 2N; attention's quadratic
term left out) over `--peak-tflops` per GPU.

Memory: each rank's peak host memory while loading and over the round (above its resident size
before the load; the workers measure it, `actors.sharded_model.HostMemory`), as a multiple of
the model's float32 bytes / the world size (one rank's share of the master weights).

This is a figure, not a test. It needs no model hub: the tiny model is built locally and the
larger sizes are randomly initialised Llama configs saved with the tiny tokenizer.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # Llama-style configs; "tiny" is sppo.tiny's model as built
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    "126m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
    "0.5b": dict(hidden_size=1024, intermediate_size=4608, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
}


def model_dir(size: str, root: Path) -> str:
    """A saved model + tokenizer for `size` (randomly initialised, seeded)."""
    from sppo.tiny import build_tiny_tokenizer, ensure_tiny_llama

    if size == "tiny":
        return str(ensure_tiny_llama(root / "cache"))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / f"llama-{size}"
    if not (out / "config.json").is_file():
        tok = build_tiny_tokenizer()
        spec = {"vocab_size": len(tok), **SIZES[size]}
        config = LlamaConfig(max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=None,
                             tie_word_embeddings=False, **spec)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def make_rows(n: int, vocab: int, prompt_len: int, response_len: int, seed: int = 0):
    """Pair rows with lengths jittered +-25% (so length bucketing has something to do)."""
    from sppo.records import TrainRow

    rng = random.Random(seed)

    def ids(length: int) -> list[int]:
        k = max(1, int(length * rng.uniform(0.75, 1.25)))
        return [rng.randrange(10, vocab) for _ in range(k)]

    return [TrainRow(prompt_id=f"b{i}", prompt_ids=ids(prompt_len),
                     chosen_ids=ids(response_len), chosen_p=rng.uniform(0.5, 1.0),
                     rejected_ids=ids(response_len), rejected_p=rng.uniform(0.0, 0.5))
            for i in range(n)]


def parse_micro(spec: str) -> dict:
    """`rows:N` or `tokens:N` -> the TrainerConfig fields."""
    kind, _, n = spec.partition(":")
    if kind not in ("rows", "tokens") or not n.isdigit() or int(n) < 1:
        raise SystemExit(f"--micro: {spec!r} is not rows:N or tokens:N")
    return ({"micro_batch_size": int(n)} if kind == "rows"
            else {"micro_batch_tokens": int(n)})


def planned(trainer, path: str) -> dict:
    """The memory plan's trainer figures for this variant (`sppo.plan`, from config.json):
    bytes per rank over a step and while loading."""
    import dataclasses

    from sppo.config import Config
    from sppo.plan import build_plan

    base = Config()
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, path=path),
                              trainer=trainer)
    role = next(r for r in build_plan(cfg, None).roles if r.name == "trainer")
    return {"round": role.total, "load": role.host_load}


def measure(workers: int, micro: str, args, path: str, rows, storage: str) -> dict:
    import ray

    from actors.stream import create_stream
    from actors.trainer import TrainerRun
    from sppo.config import TrainerConfig

    cuda = args.device == "cuda"
    cfg = TrainerConfig(num_workers=workers, use_gpu=cuda, optimizer="adamw", lr=1e-5,
                        eta=1000.0, global_batch_size=args.global_batch,
                        max_length=args.max_length, **parse_micro(micro),
                        stream_buffer=max(256, args.global_batch), max_failures=0,
                        mixed_precision="auto", activation_checkpointing=args.checkpointing)

    stream = create_stream(world_size=workers, global_batch_size=cfg.global_batch_size,
                           buffer_rows=cfg.stream_buffer, epochs=1, max_length=cfg.max_length,
                           selection="pair", reference="frozen")
    run = TrainerRun(model_path=path, trainer=cfg, stream=stream, storage_path=storage,
                     name=f"bench-{workers}w-{int(time.time())}").start()
    try:
        ray.get(stream.begin_round.remote(0, len(rows)))
        ray.get(stream.put.remote(0, rows))
        ray.get(stream.end_round.remote(0))
        result = run.wait_round_done(0, timeout_s=3600)
        steps = ray.get(stream.step_metrics.remote(0))
        run.finish(timeout_s=600)
    finally:
        ray.kill(stream)
    timed = steps[1:] or steps
    tokens = sum(m["tokens"] for m in timed)
    seconds = sum(m["step_time_s"] for m in timed)
    report = result.report
    return {"workers": workers, "micro": micro, "steps": len(steps), "tokens": tokens,
            "plan": planned(cfg, path),
            "seconds": seconds, "tokens_per_s": tokens / seconds,
            "rows_trained": report["rows_trained"],
            "load_peak": report["host_peak_load_bytes"],
            "round_peak": report["host_peak_round_bytes"],
            "device_peak": report.get("device_peak_round_bytes")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model-size", choices=["tiny", *SIZES], default="126m")
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--micro", nargs="+", default=["rows:1", "tokens:2048"],
                   help="micro-batchings to compare: rows:N (N rows a pass) or tokens:N "
                        "(packed up to N padded tokens a pass; >= 2 x --max-length)")
    p.add_argument("--rows", type=int, default=32, help="pair rows in the round")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--response-len", type=int, default=96)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="per-GPU dense bf16 peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--work-dir", default=None, help="models and run storage (default: a temp dir)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, 4 steps of short rows on 2 workers, both micro-batchings: "
                        "the code path quickly (tests/bench)")
    if p.parse_known_args()[0].smoke:  # flags given explicitly still win
        # One worker count: each TorchTrainer run takes ~40 s to start on 2 cores.
        p.set_defaults(model_size="tiny", workers=[2], micro=["rows:1", "tokens:128"], rows=16,
                       global_batch=4, prompt_len=8, response_len=8, max_length=64)
    args = p.parse_args()

    import ray
    from transformers import AutoConfig, AutoModelForCausalLM

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="sppo-bench-train-"))
    path = model_dir(args.model_size, root)
    config = AutoConfig.from_pretrained(path)
    with __import__("torch").device("meta"):
        n_params = sum(t.numel() for t in AutoModelForCausalLM.from_config(config).parameters())
    rows = make_rows(args.rows, config.vocab_size, args.prompt_len, args.response_len)

    if not ray.is_initialized():
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                           "HF_HUB_OFFLINE": "1"}})
    results = [measure(w, m, args, path, rows, str(root / "runs"))
               for w in args.workers for m in args.micro]

    print(f"\nmodel {args.model_size} ({n_params / 1e6:.1f}M params), device {args.device}, "
          f"{args.rows} pair rows, global batch {args.global_batch}, prompt "
          f"~{args.prompt_len} + response ~{args.response_len} tokens")
    base = results[0]
    print(f"{'workers':>8} {'micro':>12} {'steps':>6} {'tokens':>8} {'seconds':>8} "
          f"{'tokens/s':>10} {'ratio':>6}" + ("     MFU" if args.device == "cuda" else ""))
    for r in results:
        line = (f"{r['workers']:>8} {r['micro']:>12} {r['steps']:>6} {r['tokens']:>8} "
                f"{r['seconds']:>8.2f} {r['tokens_per_s']:>10.1f} "
                f"{r['tokens_per_s'] / base['tokens_per_s']:>6.2f}")
        if args.device == "cuda":
            mfu = r["tokens_per_s"] * 8 * n_params / (args.peak_tflops * 1e12 * r["workers"])
            line += f" {100 * mfu:>6.1f}%"
        print(line)
    print(f"ratio: tokens/s against the first variant ({base['workers']}w {base['micro']})")

    model_bytes = 4 * n_params  # the float32 master weights
    print(f"\nhost memory peak per rank, x (model bytes / world) = x {model_bytes / 2**20:.0f} "
          f"MiB / world")
    for r in results:
        share = model_bytes / r["workers"]
        fmt = lambda xs: " ".join(f"{x / share:.2f}" for x in xs)  # noqa: E731
        line = (f"  {r['workers']}w {r['micro']:>12}: load {fmt(r['load_peak'])}   "
                f"round {fmt(r['round_peak'])}")
        if r["device_peak"]:
            line += f"   device {fmt(r['device_peak'])}"
        print(line)
    print("memory plan's prediction (sppo/plan.py) / the largest rank's measured peak:")
    for r in results:
        peak = r["device_peak"] or r["round_peak"]
        print(f"  {r['workers']}w {r['micro']:>12}: load "
              f"{r['plan']['load'] / max(r['load_peak']):.2f}   round "
              f"{r['plan']['round'] / max(peak):.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
