"""`make gpu-check`: the parts of the project that need CUDA but neither Ray nor vLLM, measured on
one GPU as plain processes, with every figure written to one folder.

    python3 bench/gpu_check.py --out gpu-check             # on the GPU machine (~5-8 min)
    python3 bench/gpu_check.py --out /tmp/gc --device cpu --smoke   # the code path on CPU (CI)

Written for the GPU machine that can be had for short checks: one H200, Python 3.12 with torch
2.11 (cu130), transformers, numpy, safetensors and pytest, nothing reachable, no Ray and no vLLM.
Parts, each in its own process (a part that fails or needs what is not installed is reported
and the others go on):
- `pairrm`: the PairRM engine (`actors.engines.pairrm`, a random PairRM of the real width:
  DeBERTa-v3-large's hidden 1024 and 16 heads, `--pairrm-layers` layers) in fp32 and bf16 on the
  device: its logits against the CPU path's on the same inputs, and `bench/judge.py`'s batched
  pairs/s against the official call pattern (llm-blender's `Blender.rank(batch_size=1)`,
  where the per-pair attention is the risk). Needs llm-blender (0.0.2, pure Python): put its
  wheel in `--wheels` (`pip download --no-deps llm-blender==0.0.2`), else the part is skipped.
- `generate`: the HF generation engine's tokens/s (`bench/generate.py --skip-vllm`).
- `train`: the sharded model (`actors.sharded_model`: built on the meta device, filled on the
  device from a bf16 checkpoint: the sharded read, or rank 0's broadcast where this torch lacks
  what the sharded read needs) and SPPO training steps (`actors.train_step`, the SPPO loss) on a
  ~0.5B Llama with FSDP2 at world size 1 in bf16: tokens/s, and the model FLOPs utilisation
  against `--peak-tflops` (790: an H200's dense bf16), 8 x parameters FLOPs per token (policy
  forward + backward, reference forward).

Without a GPU (and without `--device cpu`) it says so, writes that to the folder and exits 1.
Figures go to `<out>/<part>.json` and `<out>/<part>.log`, and `<out>/summary.txt` lists every
part as measured, skipped (with the reason) or failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PARTS = ("pairrm", "generate", "train")


# --------------------------------------------------------------------------- parts (child processes)


def part_pairrm(args) -> dict:
    """PairRM logits on the device vs CPU, fp32 and bf16; then bench/judge.py's rates."""
    import numpy as np
    import torch

    try:
        from actors.engines.blender_compat import import_llm_blender

        import_llm_blender()
    except ImportError as exc:
        return {"skipped": f"llm-blender is not installed ({exc}): put its wheel in --wheels"}
    from actors.engines.pairrm import PairRMEngine
    from sppo.tiny_pairrm import TinyPairRMSpec, ensure_tiny_pairrm

    hidden = 64 if args.smoke else 1024
    spec = TinyPairRMSpec(hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=1 if args.smoke else args.pairrm_layers,
                          num_attention_heads=max(2, hidden // 64))
    tiny = ensure_tiny_pairrm(args.cache_dir, spec)
    prompts = ["tell me a story about a small red fox " * (2 if args.smoke else 30)] * 2
    cands = [[f"response {i} " + "the fox runs far away " * (3 if args.smoke else 40)
              for i in range(3)] for _ in prompts]
    cpu = np.stack(PairRMEngine(str(tiny.ranker_dir), backbone=str(tiny.backbone_dir),
                                device="cpu", dtype="float32").logits(prompts, cands))
    out: dict = {"width": hidden, "layers": spec.num_hidden_layers}
    for dtype in ("float32", "bfloat16"):
        eng = PairRMEngine(str(tiny.ranker_dir), backbone=str(tiny.backbone_dir),
                           device=args.device, dtype=dtype)
        got = np.stack(eng.logits(prompts, cands))
        out[f"{dtype}_max_abs_diff_vs_cpu"] = float(np.abs(got - cpu).max())
        out["max_abs_logit"] = float(np.abs(cpu).max())
    del torch
    bench = [sys.executable, str(REPO / "bench" / "judge.py"), "--backends", "pairrm",
             "--device", args.device] + (["--smoke"] if args.smoke else
                                         ["--layers", str(args.pairrm_layers), "--prompts", "4",
                                          "--k", "4", "--batch-size", "8", "32"])
    run = subprocess.run(bench, capture_output=True, text=True, timeout=900, check=False)
    out["judge_bench"] = run.stdout.strip().splitlines()[-12:]
    if run.returncode:
        out["judge_bench_error"] = run.stderr[-2000:]
    return out


def part_generate(args) -> dict:
    bench = [sys.executable, str(REPO / "bench" / "generate.py"), "--skip-vllm", "--device",
             args.device] + (["--smoke"] if args.smoke else
                             ["--hidden", "1024", "--layers", "12", "--prompts", "32",
                              "--max-new-tokens", "64"])
    run = subprocess.run(bench, capture_output=True, text=True, timeout=900, check=False)
    if run.returncode:
        raise RuntimeError(f"bench/generate.py failed:\n{run.stdout[-1500:]}{run.stderr[-1500:]}")
    return {"lines": run.stdout.strip().splitlines()[-8:]}


def _llama(root: Path, smoke: bool) -> tuple[str, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sppo.tiny import build_tiny_tokenizer

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2) if smoke else \
        dict(hidden_size=1024, intermediate_size=4608, num_hidden_layers=24,
             num_attention_heads=16, num_key_value_heads=8)  # bench/train.py's "0.5b"
    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, **size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return str(root / "model"), sum(p.numel() for p in model.parameters())


def part_train(args) -> dict:
    import random

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from actors.sharded_model import build_sharded, load_checkpoint
    from actors.train_step import train_step
    from sppo.config import TrainerConfig
    from sppo.optim import build_optimizer, build_scheduler
    from sppo.records import TrainRow

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    out: dict = {"torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, params = _llama(Path(tmp), args.smoke)
        cfg = TrainerConfig(num_workers=1, use_gpu=device.type == "cuda",
                            mixed_precision="bf16", global_batch_size=8, lr=1e-6,
                            micro_batch_tokens=256 if args.smoke else 8192, max_length=1024)
        t0 = time.perf_counter()
        policy = build_sharded(model_dir, cfg, mesh, device, trainable=True)
        try:
            out["load"] = load_checkpoint(policy, model_dir)
        except Exception as exc:  # e.g. a torch without what the sharded read needs
            out["sharded_read_error"] = f"{type(exc).__name__}: {exc}"[:500]
            out["load"] = load_checkpoint(policy, model_dir, sharded_read=False)
        reference = build_sharded(model_dir, cfg, mesh, device, trainable=False)
        from actors.sharded_model import copy_weights

        copy_weights(reference, policy)
        out["load_s"] = round(time.perf_counter() - t0, 2)
        rng = random.Random(0)
        n = 16 if args.smoke else 96
        seq = 32 if args.smoke else 512
        rows = [TrainRow(prompt_id=f"p{i}", prompt_ids=[rng.randrange(5, 500) for _ in range(seq // 4)],
                         chosen_ids=[rng.randrange(5, 500) for _ in range(seq // 2)], chosen_p=0.7,
                         rejected_ids=[rng.randrange(5, 500) for _ in range(seq // 2)],
                         rejected_p=0.3) for i in range(n)]
        opt = build_optimizer(policy, cfg.optimizer, cfg.lr, cfg.weight_decay)
        sched = build_scheduler(opt, n // cfg.global_batch_size, 0)
        steps, tokens, elapsed = [], 0, 0.0
        for s in range(0, n, cfg.global_batch_size):
            batch = rows[s:s + cfg.global_batch_size]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            m = train_step(policy, reference, opt, sched, batch, len(batch), cfg, 0, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            steps.append({"loss": m["loss"], "seconds": round(dt, 4), "tokens": m["tokens"]})
            if s:  # the first step warms up
                tokens, elapsed = tokens + m["tokens"], elapsed + dt
        rate = tokens / elapsed if elapsed else 0.0
        out.update(params=params, steps=steps, tokens_per_s=round(rate, 1),
                   mfu=round(8 * params * rate / (args.peak_tflops * 1e12), 4),
                   peak_tflops=args.peak_tflops)
        if device.type == "cuda":
            out["device_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    dist.destroy_process_group()
    return out


# --------------------------------------------------------------------------- the orchestration


def _child(args) -> None:
    fn = {"pairrm": part_pairrm, "generate": part_generate, "train": part_train}[args.part]
    result = fn(args)
    Path(args.out, f"{args.part}.json").write_text(json.dumps(result, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the code path, for CI)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--pairrm-layers", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--wheels", default=None,
                   help="a folder of wheels to add (e.g. llm-blender's), installed --no-deps")
    p.add_argument("--cache-dir", default="~/.cache/sppo-ray")
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        _child(args)
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        msg = (f"no GPU: torch {torch.__version__} sees no CUDA device (torch.version.cuda "
               f"{torch.version.cuda}); nothing was measured")
        (out / "summary.txt").write_text(msg + "\n")
        print(msg)
        return 1
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if args.wheels:
        target = out / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(target), *map(str, Path(args.wheels).glob("*.whl"))], check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [f"gpu-check on {where}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"python {sys.version.split()[0]}"]
    failed = False
    for part in args.parts:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--part", part, "--out", str(out), "--device",
               args.device, "--pairrm-layers", str(args.pairrm_layers), "--peak-tflops",
               str(args.peak_tflops), "--cache-dir", args.cache_dir] + \
            (["--smoke"] if args.smoke else [])
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200,
                             check=False)
        (out / f"{part}.log").write_text(run.stdout + run.stderr)
        took = f"{time.perf_counter() - t0:.0f} s"
        result = json.loads((out / f"{part}.json").read_text()) \
            if run.returncode == 0 and (out / f"{part}.json").is_file() else None
        if result is None:
            failed = True
            tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["?"]
            lines.append(f"{part}: FAILED ({took}): {tail[0][:300]}")
        elif "skipped" in result:
            lines.append(f"{part}: skipped: {result['skipped']}")
        else:
            shown = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
            lines.append(f"{part}: measured ({took}): {json.dumps(shown)}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
